"""`migrate lint`: what a pending statement would do to a live database.

Pure: each statement's `Facts` (`facts.read_statement`, read once, while the file is parsed
for the run's own checks) and a `Catalog` snapshot (the live tables and their sizes, read by
`ledger.read_catalog`) give the findings. A rule fires only on a table that exists before the
run: a table created by an earlier statement of the same run is new, and nothing waits on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from towerctl.migrations.files import Migration


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
        Rule("drop-not-null", "ACCESS EXCLUSIVE (brief)", "the running application's readers "
             "that assume a value (they meet NULLs once newer code writes them)",
             "the application deployed now may rely on the column never being NULL",
             "keep NOT NULL and give the column a DEFAULT; or deploy readers that handle NULL "
             "first and drop NOT NULL in a later release"),
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
        Rule("drop-index-not-concurrent", "ACCESS EXCLUSIVE on the table (brief)",
             "reads and writes of the table, from when it starts waiting for the lock",
             "DROP INDEX without CONCURRENTLY takes the table's strongest lock",
             f"DROP INDEX CONCURRENTLY IF EXISTS {_NO_TX}"),
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
    on_indexes: tuple[tuple[str, TableRef], ...] = ()  # (rule, index): the index's table risks
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
                # an index and its table share a schema: named as the index was
                return TableRef(table[0] if ref.schema else None, table[1]) if table else None
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
            for rule_name, index in facts.on_indexes:
                table = run.index_table(index)
                if table is not None:
                    risks.append((rule_name, table))
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
