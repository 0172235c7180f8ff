"""What one statement does that `migrate lint` needs, read from its parse node (libpg_query's
JSON, as the run's own checks read it): the tables it risks locking by rule, the tables and
indexes it creates or renames, whether it sets a lock timeout, and its lint-ok comments."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from towerctl.migrations.lint import Facts, TableRef

if TYPE_CHECKING:
    from towerctl.migrations.grammar import Statement

_LINT_OK = re.compile(r"^\s*--\s*towerctl:lint-ok\s+([A-Za-z0-9_-]+)[ \t]*(.*)$", re.MULTILINE)


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
    if subtype == "AT_DropNotNull":
        return ["drop-not-null"]
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
    if node.get("removeType") == "OBJECT_INDEX" and not node.get("concurrent"):
        indexes = [_qualified(_names(o)) for o in node.get("objects", [])]
        return (), (), (), (), tuple(("drop-index-not-concurrent", i) for i in indexes if i)
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
        return (), (), (), (), (("reindex-not-concurrent", target),)
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
