"""A migration file's statements, as PostgreSQL's own grammar finds them.

libpg_query (through pglast) is the server's parser compiled as a library, so
towerctl and the server never disagree on where a statement ends, what kind of
statement it is, or whether it controls the transaction. pglast reports
locations in characters (it converts libpg_query's byte offsets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pglast import ast, parser

# Statements PostgreSQL refuses inside a transaction block: a transactional file
# holding one would fail at run time, so it is refused before anything runs.
_NEEDS_NO_TRANSACTION = (
    ast.VacuumStmt,
    ast.CreatedbStmt,
    ast.DropdbStmt,
    ast.AlterSystemStmt,
    ast.CreateTableSpaceStmt,
    ast.DropTableSpaceStmt,
)
_LOCATION_KEYS = frozenset({"location", "stmt_location", "stmt_len"})


@dataclass(frozen=True)
class Statement:
    text: str
    line: int  # 1-based line of the statement's first token in the script
    kind: str  # the parse node's name: "CreateStmt", "TransactionStmt", ...
    node: Any = None  # the pglast node (for the checks below)

    def line_of(self, position: int) -> int:
        """The script line of a 1-based character position within this statement."""
        return self.line + self.text[: max(position - 1, 0)].count("\n")


class SQLSyntaxError(ValueError):
    """The grammar refused the script; `line` is where (1-based)."""

    def __init__(self, message: str, line: int, index: int = 0) -> None:
        super().__init__(message)
        self.line = line
        self.index = index  # 0-based character position of the error


def parser_version() -> str:
    major, minor = parser.get_postgresql_version()
    return f"{major}.{minor}"


def parse_script(script: str) -> list[Statement]:
    """Every statement of `script` with its first line; raises `SQLSyntaxError`."""
    try:
        raw = parser.parse_sql(script)
    except parser.ParseError as error:
        message = str(error.args[0]) if error.args else str(error)
        index = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], int) else 0
        index = max(index, 0)
        raise SQLSyntaxError(message, script.count("\n", 0, index) + 1, index) from None
    statements: list[Statement] = []
    for item in raw:
        start = item.stmt_location or 0
        end = start + item.stmt_len if item.stmt_len else len(script)
        text = script[start:end].strip()
        # stmt_location points at the statement's first token (comments before it skipped).
        lead = len(script[start:end]) - len(script[start:end].lstrip())
        line = script.count("\n", 0, start + lead) + 1
        statements.append(Statement(text, line, type(item.stmt).__name__, item.stmt))
    return statements


def is_transaction_control(statement: Statement) -> bool:
    return isinstance(statement.node, ast.TransactionStmt)


def copy_with_client(statement: Statement) -> str | None:
    """'FROM STDIN' / 'TO STDOUT' when a COPY needs the client's data stream."""
    node = statement.node
    if isinstance(node, ast.CopyStmt) and node.filename is None and not node.is_program:
        return "FROM STDIN" if node.is_from else "TO STDOUT"
    return None


def needs_no_transaction(statement: Statement) -> bool:
    """Whether PostgreSQL refuses this statement inside a transaction block."""
    node = statement.node
    if isinstance(node, _NEEDS_NO_TRANSACTION):
        return True
    if isinstance(node, ast.IndexStmt | ast.DropStmt):
        return bool(node.concurrent)
    if isinstance(node, ast.ReindexStmt):
        return _has_option(node.params, "concurrently")
    return False


def _has_option(params: Any, name: str) -> bool:
    for item in params or ():
        if isinstance(item, ast.DefElem) and item.defname == name:
            return item.arg is None or str(getattr(item.arg, "sval", "true")) != "false"
    return False


def rerunnable(statement: Statement) -> bool:
    """Whether running the statement a second time changes nothing more than the first did:
    the rule for no-transaction files, whose failures cannot be rolled back."""
    node = statement.node
    if isinstance(node, ast.IndexStmt):
        return bool(node.concurrent and node.if_not_exists)
    if isinstance(node, ast.DropStmt):
        return bool(node.concurrent and node.missing_ok)
    if isinstance(node, ast.ReindexStmt):
        return _has_option(node.params, "concurrently")
    if isinstance(node, ast.VacuumStmt):
        return True
    if isinstance(node, ast.AlterEnumStmt):
        return bool(node.newVal and node.skipIfNewValExists)
    if isinstance(node, ast.SelectStmt):
        return node.intoClause is None and not node.lockingClause and not _writes(node)
    return False


def _writes(select: ast.SelectStmt) -> bool:
    ctes = select.withClause.ctes if select.withClause else ()
    return any(
        isinstance(cte, ast.CommonTableExpr) and not isinstance(cte.ctequery, ast.SelectStmt)
        for cte in ctes or ()
    )


def parse_tree(script: str) -> list[Any]:
    """The parse tree of `script` without source locations: equal for two scripts exactly when
    PostgreSQL reads the same statements from both (comments, whitespace, keyword case aside)."""
    try:
        tree = json.loads(parser.parse_sql_json(script))
    except parser.ParseError as error:
        raise SQLSyntaxError(str(error.args[0]) if error.args else str(error), 1) from None
    return [_strip_locations(item["stmt"]) for item in tree.get("stmts", [])]


def _strip_locations(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_locations(v) for k, v in value.items() if k not in _LOCATION_KEYS}
    if isinstance(value, list):
        return [_strip_locations(v) for v in value]
    return value
