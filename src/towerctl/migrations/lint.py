"""`migrate lint`: what a pending statement would do to a live database.

Pure: a statement's parse node gives its `Facts` (read once, while the file is parsed for the
run's own checks), and the facts of the pending files with a `Catalog` snapshot (the live
tables and their sizes, read by `ledger.read_catalog`) give the findings. A rule fires only on
a table that exists before the run: a table created by an earlier statement of the same run
is new, and nothing waits on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from towerctl.migrations.files import Migration
    from towerctl.migrations.grammar import Statement

LINT_OK = "towerctl:lint-ok"
_LINT_OK = re.compile(r"^\s*--\s*towerctl:lint-ok\s+([A-Za-z0-9_-]+)[ \t]*(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Rule:
    name: str
    lock: str  # the lock the statement takes
    blocks: str  # what waits while it holds that lock
    why: str
    fix: str


_REWRITE = "reads and writes while the table is rewritten"
_NO_TX = "in a file of its own whose first line is '-- towerctl:no-transaction'"
_LATER_VALIDATE = (
    "add it with NOT VALID (new rows are checked at once), then VALIDATE CONSTRAINT in a later "
    "file: validation takes SHARE UPDATE EXCLUSIVE, which lets reads and writes go on"
)
RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("index-not-concurrent", "SHARE", "writes (INSERT, UPDATE, DELETE)",
             "CREATE INDEX without CONCURRENTLY reads the whole table while holding its lock",
             f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {_NO_TX}"),
        Rule("column-type-change", "ACCESS EXCLUSIVE", "reads and writes",
             "changing a column's type rewrites the table and rebuilds its indexes under the "
             "lock (a few widenings, such as varchar(n) to text, are exempt)",
             "add a column of the new type, backfill it in batches, move the application "
             "over, then drop the old column"),
        Rule("set-not-null", "ACCESS EXCLUSIVE", "reads and writes",
             "SET NOT NULL scans every row under the lock to prove there is no NULL",
             "ADD CONSTRAINT … CHECK (column IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT in a "
             "later file, then SET NOT NULL (PostgreSQL 12+ uses the valid check and skips "
             "the scan) and drop the check"),
        Rule("add-column-not-null", "ACCESS EXCLUSIVE", "reads and writes",
             "a NOT NULL column without a default fails on a table that has rows",
             "give it a constant DEFAULT (a catalog-only change since PostgreSQL 11), or add "
             "it nullable, backfill, and follow the set-not-null route"),
        Rule("check-without-not-valid", "ACCESS EXCLUSIVE", "reads and writes",
             "a CHECK constraint added without NOT VALID checks every row under the lock",
             _LATER_VALIDATE),
        Rule("foreign-key-without-not-valid", "SHARE ROW EXCLUSIVE (both tables)",
             "writes to this table and to the table it references",
             "a foreign key added without NOT VALID checks every row under the lock",
             _LATER_VALIDATE),
        Rule("unique-in-place", "ACCESS EXCLUSIVE", "reads and writes",
             "a UNIQUE, PRIMARY KEY or EXCLUDE constraint builds its index under the lock",
             f"CREATE UNIQUE INDEX CONCURRENTLY {_NO_TX}, then ADD CONSTRAINT … UNIQUE "
             "(or PRIMARY KEY) USING INDEX"),
        Rule("volatile-default", "ACCESS EXCLUSIVE", "reads and writes",
             "a column whose default is volatile (or unknown: functions are VOLATILE unless "
             "declared otherwise), a serial, identity or stored generated column is written "
             "into every row: the table is rewritten",
             "add the column without a default (or with a constant), SET DEFAULT for new rows, "
             "backfill the existing rows in batches"),
        Rule("drop-column", "ACCESS EXCLUSIVE (brief)", "the running application's queries "
             "that name the column (they fail once it is gone)",
             "the application deployed now may still read or write the column",
             "stop using the column in the application and deploy that first; drop it in a "
             "later release"),
        Rule("drop-table", "ACCESS EXCLUSIVE (brief)", "the running application's queries "
             "on the table (they fail once it is gone)",
             "the application deployed now may still use the table",
             "stop using the table in the application and deploy that first; drop it in a "
             "later release"),
        Rule("rename-column", "ACCESS EXCLUSIVE (brief)", "the running application's queries "
             "that name the column by its old name (they fail)",
             "the application deployed now knows the column by its old name",
             "add the new column beside the old (kept in step by a trigger), move the "
             "application over, then drop the old one"),
        Rule("rename-table", "ACCESS EXCLUSIVE (brief)", "the running application's queries "
             "that name the table by its old name (they fail)",
             "the application deployed now knows the table by its old name",
             "rename, then create a view with the old name for the running application; drop "
             "the view once every client uses the new name"),
        Rule("lock-timeout-missing", "waits for ACCESS EXCLUSIVE with no limit",
             "every query on the table that arrives while the ALTER waits in the lock queue",
             "ALTER TABLE waits behind any long transaction, and every query behind it waits "
             "too, with no lock_timeout set (TOWER_MIGRATION_LOCK_TIMEOUT is 0 and the file "
             "sets none)",
             "SET lock_timeout = '5s' at the top of the file (or keep "
             "TOWER_MIGRATION_LOCK_TIMEOUT above 0) and retry a file that times out"),
        Rule("vacuum-full", "ACCESS EXCLUSIVE", _REWRITE,
             "VACUUM FULL writes a new copy of the table and its indexes under the lock",
             "plain VACUUM for dead rows; pg_repack to compact the table online"),
        Rule("cluster", "ACCESS EXCLUSIVE", _REWRITE,
             "CLUSTER writes a new, reordered copy of the table under the lock",
             "pg_repack --order-by to reorder the table online"),
        Rule("reindex-not-concurrent", "SHARE on the table, ACCESS EXCLUSIVE on the index",
             "writes, and reads that use the index",
             "REINDEX without CONCURRENTLY rebuilds the index under the lock",
             f"REINDEX … CONCURRENTLY {_NO_TX}"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class TableRef:
    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class Facts:
    """What one statement does that the lint needs, from its parse node (no catalog)."""

    line: int
    risks: tuple[tuple[str, TableRef], ...] = ()  # (rule, table), where the table exists
    creates: tuple[TableRef, ...] = ()
    renames: tuple[tuple[TableRef, TableRef], ...] = ()  # tables: (old, new)
    indexes: tuple[tuple[TableRef, TableRef], ...] = ()  # (index created, its table)
    reindexes: tuple[TableRef, ...] = ()  # REINDEX INDEX without CONCURRENTLY: the index
    alters: TableRef | None = None  # ALTER TABLE: needs a lock timeout
    lock_timeout: bool | None = None  # the statement sets (True) or clears (False) it
    accepted: Mapping[str, str] = field(default_factory=dict)  # rule -> reason (lint-ok)


@dataclass(frozen=True)
class TableSize:
    rows: int | None  # pg_class.reltuples (None: never analyzed)
    bytes: int  # pg_total_relation_size


@dataclass(frozen=True)
class Catalog:
    """The live tables before the run: sizes by (schema, name), indexes' tables, search path."""

    search_path: tuple[str, ...]
    tables: Mapping[tuple[str, str], TableSize]
    indexes: Mapping[tuple[str, str], tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    file: str
    version: int
    line: int
    rule: str
    table: str
    rows: int | None
    bytes: int
    lock: str
    blocks: str
    why: str
    fix: str
    accepted: bool = False
    reason: str | None = None  # the lint-ok comment's reason

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "version": self.version, "line": self.line, "rule": self.rule,
            "table": self.table, "rows": self.rows, "bytes": self.bytes, "lock": self.lock,
            "blocks": self.blocks, "why": self.why, "fix": self.fix, "accepted": self.accepted,
            "reason": self.reason,
        }  # fmt: skip


def describe_size(rows: int | None, size: int) -> str:
    """'20 M rows, 4 GB': the estimate PostgreSQL keeps (reltuples), and the size on disk."""
    counted = "rows unknown (never analyzed)" if rows is None else f"{_short(rows, 1000)} rows"
    return f"{counted}, {_short(size, 1024, 'B')}"


def _short(value: int, base: int, unit: str = "") -> str:
    for prefix in ("", " k", " M", " G", " T"):
        if value < base or prefix == " T":
            if not unit:
                return f"{value:,}{prefix}"
            return f"{value} {prefix.strip()}{unit}" if prefix else f"{value} {unit}"
        value = round(value / base)
    return str(value)


# --- facts from the parse tree ----------------------------------------------------------------


def read_statement(statement: Statement) -> Facts | None:
    """The statement's facts, or None when it does nothing the lint looks at."""
    reader = _READERS.get(statement.kind)
    facts = reader(statement.node or {}) if reader else None
    if facts is None:
        return None
    accepted = {m.group(1): m.group(2).strip() for m in _LINT_OK.finditer(statement.comments)}
    return Facts(statement.line, *facts, accepted=accepted)  # type: ignore[misc]


# A reader returns the positional fields of `Facts` after `line` (or None).
_Parts = tuple[Any, ...]


def _ref(rangevar: Mapping[str, Any] | None) -> TableRef | None:
    if not rangevar or "relname" not in rangevar:
        return None
    return TableRef(rangevar.get("schemaname"), rangevar["relname"])


def _names(node: Any) -> list[str]:
    items = node.get("List", {}).get("items", []) if isinstance(node, dict) else []
    return [i["String"]["sval"] for i in items if "String" in i]


def _read_index(node: Mapping[str, Any]) -> _Parts | None:
    table = _ref(node.get("relation"))
    if table is None:
        return None
    risks = () if node.get("concurrent") else (("index-not-concurrent", table),)
    made = ((TableRef(table.schema, node["idxname"]), table),) if node.get("idxname") else ()
    return risks, (), (), made


def _read_create(node: Mapping[str, Any]) -> _Parts | None:
    table = _ref(node.get("relation") or (node.get("into") or {}).get("rel"))
    return ((), (table,)) if table else None


def _read_select_into(node: Mapping[str, Any]) -> _Parts | None:
    table = _ref((node.get("intoClause") or {}).get("rel"))
    return ((), (table,)) if table else None


def _read_alter(node: Mapping[str, Any]) -> _Parts | None:
    table = _ref(node.get("relation"))
    if table is None or node.get("objtype", "OBJECT_TABLE") != "OBJECT_TABLE":
        return None
    risks: list[tuple[str, TableRef]] = []
    for item in node.get("cmds", []):
        cmd = item.get("AlterTableCmd", {})
        risks.extend((rule, table) for rule in _command_rules(cmd))
    return tuple(dict.fromkeys(risks)), (), (), (), (), table


def _command_rules(cmd: Mapping[str, Any]) -> list[str]:
    subtype = cmd.get("subtype")
    definition = cmd.get("def") or {}
    if subtype == "AT_AlterColumnType":
        return ["column-type-change"]
    if subtype == "AT_SetNotNull":
        return ["set-not-null"]
    if subtype == "AT_DropColumn":
        return ["drop-column"]
    if subtype == "AT_AddColumn" and "ColumnDef" in definition:
        return _new_column_rules(definition["ColumnDef"])
    if subtype == "AT_AddConstraint" and "Constraint" in definition:
        constraint = definition["Constraint"]
        kind = constraint.get("contype")
        if kind in ("CONSTR_CHECK", "CONSTR_FOREIGN") and not constraint.get("skip_validation"):
            return ["check-without-not-valid" if kind == "CONSTR_CHECK" else
                    "foreign-key-without-not-valid"]  # fmt: skip
        if kind in ("CONSTR_UNIQUE", "CONSTR_PRIMARY", "CONSTR_EXCLUSION"):
            return [] if constraint.get("indexname") else ["unique-in-place"]
    return []


_SERIAL = frozenset({"smallserial", "serial", "bigserial", "serial2", "serial4", "serial8"})


def _new_column_rules(column: Mapping[str, Any]) -> list[str]:
    rules: list[str] = []
    kinds = {}
    for item in column.get("constraints", []):
        constraint = item.get("Constraint", {})
        kinds[constraint.get("contype")] = constraint
    type_names = [
        n.get("String", {}).get("sval") for n in column.get("typeName", {}).get("names", [])
    ]
    default = kinds.get("CONSTR_DEFAULT")
    rewrites = (
        "CONSTR_IDENTITY" in kinds
        or "CONSTR_GENERATED" in kinds
        or (type_names and type_names[-1] in _SERIAL)
        or (default is not None and _volatile(default.get("raw_expr")))
    )
    if rewrites:
        rules.append("volatile-default")
    if "CONSTR_NOTNULL" in kinds and default is None and not rewrites:
        rules.append("add-column-not-null")
    if "CONSTR_UNIQUE" in kinds or "CONSTR_PRIMARY" in kinds:
        rules.append("unique-in-place")
    foreign = kinds.get("CONSTR_FOREIGN")
    if foreign is not None and not foreign.get("skip_validation") and default is not None:
        rules.append("foreign-key-without-not-valid")
    check = kinds.get("CONSTR_CHECK")
    if check is not None and not check.get("skip_validation") and default is not None:
        rules.append("check-without-not-valid")
    return rules


# Functions a default may call without rewriting the table (STABLE or IMMUTABLE): evaluated
# once when the column is added. Any other function may be VOLATILE (the default of CREATE
# FUNCTION), which PostgreSQL evaluates per row, rewriting the table.
_NOT_VOLATILE = frozenset({
    "now", "statement_timestamp", "transaction_timestamp", "current_setting", "lower", "upper",
    "btrim", "trim", "concat", "length", "coalesce", "nullif", "greatest", "least", "to_jsonb",
    "to_json", "jsonb_build_object", "json_build_object", "jsonb_build_array", "array_fill",
    "make_interval", "make_date", "make_timestamp", "make_timestamptz", "timezone",
    "date_trunc", "to_timestamp", "to_char", "to_date", "md5", "abs", "round",
})  # fmt: skip


def _volatile(expr: Any) -> bool:
    if isinstance(expr, dict):
        call = expr.get("FuncCall")
        if call is not None:
            name = (call.get("funcname") or [{}])[-1].get("String", {}).get("sval", "")
            if name.lower() not in _NOT_VOLATILE:
                return True
        return any(_volatile(value) for value in expr.values())
    if isinstance(expr, list):
        return any(_volatile(value) for value in expr)
    return False


def _read_drop(node: Mapping[str, Any]) -> _Parts | None:
    if node.get("removeType") != "OBJECT_TABLE":
        return None
    tables = [_qualified(_names(o)) for o in node.get("objects", [])]
    return tuple(("drop-table", t) for t in tables if t is not None), ()


def _qualified(names: Sequence[str]) -> TableRef | None:
    if not names:
        return None
    return TableRef(names[-2] if len(names) > 1 else None, names[-1])


def _read_rename(node: Mapping[str, Any]) -> _Parts | None:
    table = _ref(node.get("relation"))
    kind = node.get("renameType")
    if table is None:
        return None
    if kind == "OBJECT_COLUMN" and node.get("relationType") == "OBJECT_TABLE":
        return (("rename-column", table),), ()
    if kind == "OBJECT_TABLE":
        return (("rename-table", table),), (), ((table, TableRef(table.schema, node["newname"])),)
    return None


def _read_set(node: Mapping[str, Any]) -> _Parts | None:
    if node.get("name") != "lock_timeout":
        return None
    if node.get("kind") != "VAR_SET_VALUE":
        return (), (), (), (), (), None, False
    args = node.get("args") or [{}]
    value = args[0].get("A_Const", {})
    text = str(value.get("sval", {}).get("sval", value.get("ival", {}).get("ival", 0)))
    return (), (), (), (), (), None, re.fullmatch(r"\s*0+\s*(ms|s|min|h|d)?\s*", text) is None


def _read_vacuum(node: Mapping[str, Any]) -> _Parts | None:
    options = {o.get("DefElem", {}).get("defname") for o in node.get("options", [])}
    if "full" not in options or not node.get("is_vacuumcmd", False):
        return None
    tables = [_ref(r.get("VacuumRelation", {}).get("relation")) for r in node.get("rels", [])]
    return tuple(("vacuum-full", t) for t in tables if t is not None), ()


def _read_cluster(node: Mapping[str, Any]) -> _Parts | None:
    table = _ref(node.get("relation"))
    return ((("cluster", table),), ()) if table else None


def _read_reindex(node: Mapping[str, Any]) -> _Parts | None:
    params = {p.get("DefElem", {}).get("defname") for p in node.get("params") or []}
    target = _ref(node.get("relation"))
    if "concurrently" in params or target is None:
        return None
    if node.get("kind") == "REINDEX_OBJECT_INDEX":
        return (), (), (), (), (target,)
    return (("reindex-not-concurrent", target),), ()


_READERS = {
    "IndexStmt": _read_index,
    "CreateStmt": _read_create,
    "CreateTableAsStmt": _read_create,
    "SelectStmt": _read_select_into,
    "AlterTableStmt": _read_alter,
    "DropStmt": _read_drop,
    "RenameStmt": _read_rename,
    "VariableSetStmt": _read_set,
    "VacuumStmt": _read_vacuum,
    "ClusterStmt": _read_cluster,
    "ReindexStmt": _read_reindex,
}


# --- findings: the facts against the catalog ------------------------------------------------


class _Run:
    """Which tables are new (made earlier in the run) and which existed before it."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.path = catalog.search_path or ("public",)
        self.new: set[tuple[str, str]] = set()
        self.moved: dict[tuple[str, str], tuple[str, str]] = {}  # renamed existing tables
        self.indexes: dict[tuple[str, str], tuple[str, str] | None] = dict(catalog.indexes)

    def key(self, ref: TableRef) -> tuple[str, str]:
        return (ref.schema or self.path[0], ref.name)

    def existing(self, ref: TableRef) -> tuple[tuple[str, str], TableSize] | None:
        """The table as it was before the run, or None when it is new or unknown."""
        for schema in (ref.schema,) if ref.schema else self.path:
            key = (schema, ref.name)
            if key in self.new:
                return None
            original = self.moved.get(key, key)
            size = self.catalog.tables.get(original)
            if size is not None:
                return key, size
        return None

    def index_table(self, ref: TableRef) -> TableRef | None:
        for schema in (ref.schema,) if ref.schema else self.path:
            if (schema, ref.name) in self.indexes:
                table = self.indexes[(schema, ref.name)]
                return TableRef(*table) if table else None
        return None

    def record(self, facts: Facts) -> None:
        for ref in facts.creates:
            self.new.add(self.key(ref))
        for old, new in facts.renames:
            before = self.existing(old)
            if before is None:
                self.new.add(self.key(new))
            else:
                self.moved[self.key(new)] = self.moved.get(before[0], before[0])
        for index, table in facts.indexes:
            before = self.existing(table)
            self.indexes[self.key(index)] = before[0] if before else None


def lint(
    files: Iterable[tuple[Migration, Sequence[Facts]]],
    catalog: Catalog,
    *,
    runner_sets_lock_timeout: bool = True,
) -> list[Finding]:
    """The findings of the pending files, in run order, against the tables before the run.
    `runner_sets_lock_timeout`: towerctl sets a lock timeout for every file itself unless
    TOWER_MIGRATION_LOCK_TIMEOUT is 0."""
    run = _Run(catalog)
    findings: list[Finding] = []
    for migration, all_facts in files:
        timeout = runner_sets_lock_timeout
        for facts in all_facts:
            risks = list(facts.risks)
            risks += [
                ("reindex-not-concurrent", table)
                for table in map(run.index_table, facts.reindexes)
                if table is not None
            ]
            if facts.alters is not None and not timeout:
                risks.append(("lock-timeout-missing", facts.alters))
            for rule_name, ref in risks:
                found = run.existing(ref)
                if found is None:
                    continue
                rule, size = RULES[rule_name], found[1]
                reason = facts.accepted.get(rule_name)
                findings.append(
                    Finding(migration.filename, migration.version, facts.line, rule_name,
                            str(ref), size.rows, size.bytes, rule.lock, rule.blocks, rule.why,
                            rule.fix, reason is not None, reason or None)
                )  # fmt: skip
            if facts.lock_timeout is not None:
                timeout = facts.lock_timeout
            run.record(facts)
    return findings
