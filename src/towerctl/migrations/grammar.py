"""A migration file's statements, as PostgreSQL's own grammar finds them.

libpg_query (through pglast) is the server's parser compiled as a library, so
towerctl and the server never disagree on where a statement ends, what kind of
statement it is, or whether it controls the transaction.

A file is parsed once, into libpg_query's own JSON (built in C, read by the C
`json` decoder), in pieces of about a megabyte that the parser confirms end at a
statement's `;`: statement boundaries, lines, kinds, the checks below and the
lint's facts all come from that one parse, each statement's tree dropped once it
is read, so memory stays bounded and time linear whatever the file's size. Locations
in the JSON are UTF-8 byte offsets, so a piece is sliced as bytes and lines are
counted forward from one statement to the next. The tree checksum of a file read in
one piece is computed from the kept JSON text when first asked for (a run asks for a
file's while the server runs the file before it); a bigger file's takes a second
pass over its pieces, which a dry run never asks for.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pglast import parser

# Statements PostgreSQL refuses inside a transaction block: a transactional file
# holding one would fail at run time, so it is refused before anything runs.
_NEEDS_NO_TRANSACTION = frozenset(
    {
        "VacuumStmt",
        "CreatedbStmt",
        "DropdbStmt",
        "AlterSystemStmt",
        "CreateTableSpaceStmt",
        "DropTableSpaceStmt",
    }
)
# A node's `"location":N` member in libpg_query's JSON (a key, never string content: inside a
# JSON string every `"` is escaped). The statement's own stmt_location/stmt_len sit beside the
# node, not in it, so the node without these members is the tree the checksum covers.
_LOCATION = re.compile(r',"location":-?[0-9]+|"location":-?[0-9]+,?')


@dataclass(frozen=True)
class Statement:
    text: str
    line: int  # 1-based line of the statement's first token in the script
    kind: str  # the parse node's name: "CreateStmt", "TransactionStmt", ...
    node: Any = None  # the node's fields, as libpg_query's JSON gives them (for the checks below)
    comments: str = ""  # the comment lines between the previous statement's line and this one

    def line_of(self, position: int) -> int:
        """The script line of a 1-based character position within this statement."""
        return self.line + self.text[: max(position - 1, 0)].count("\n")


@dataclass(frozen=True)
class ParsedScript:
    statements: list[Statement]
    tree_json: str | None = field(repr=False)  # libpg_query's JSON of a file read in one piece
    script: str = field(default="", repr=False)  # the file, when read in several pieces

    @cached_property
    def tree_checksum(self) -> str:
        """See `tree_checksum`: from the kept JSON, or a second pass over a big file's pieces
        (a dry run never asks; keeping every piece's JSON would cost more than the file)."""
        if self.tree_json is not None:
            return _digest(self.tree_json)
        whole = hashlib.sha256(b"[")
        separator = b""
        for _offset, _text, tree, _items in _pieces(self.script):
            for stripped in _stripped_statements(tree):
                whole.update(separator + stripped.encode())
                separator = b", "
        whole.update(b"]")
        return whole.hexdigest()


class SQLSyntaxError(ValueError):
    """The grammar refused the script; `line` is where (1-based)."""

    def __init__(self, message: str, line: int, index: int = 0) -> None:
        super().__init__(message)
        self.line = line
        self.index = index  # 0-based character position of the error


def parser_version() -> str:
    major, minor = parser.get_postgresql_version()
    return f"{major}.{minor}"


def _parse_json(script: str, offset: int = 0, whole: str | None = None) -> str:
    """libpg_query's JSON of `script`; a syntax error names its line in `whole` (the file that
    `script` is a piece of, starting at character `offset`)."""
    try:
        return str(parser.parse_sql_json(script))
    except parser.ParseError as error:
        message = str(error.args[0]) if error.args else str(error)
        index = error.args[1] if len(error.args) > 1 and isinstance(error.args[1], int) else 0
        index = offset + max(index, 0)  # pglast gives the error's position in characters
        text = script if whole is None else whole
        raise SQLSyntaxError(message, text.count("\n", 0, index) + 1, index) from None


# A file is parsed in pieces of about this many characters, each ending at a statement's
# `;` as the parser itself confirms: memory stays bounded whatever the file's size, and
# every position is found by counting forward from the previous one (linear time).
PIECE_CHARS = 1 << 20


def _pieces(script: str) -> Iterator[tuple[int, str, str, list[Any]]]:
    """(character offset, text, libpg_query's JSON, decoded statements) of consecutive pieces
    of `script`. A piece is cut after a `;` ending a line; the cut stands when the piece
    parses and its last statement ends at that `;` (not inside a string, comment or
    `BEGIN ATOMIC` body); otherwise the piece grows (doubling) up to the end of the file,
    where a syntax error is the file's own."""
    start, size, total = 0, PIECE_CHARS, len(script)
    while start < total:
        cut = script.find(";\n", start + size) if start + size < total else -1
        end = total if cut < 0 else cut + 1
        text = script[start:end]
        if end == total:
            tree = _parse_json(text, start, script)
        else:
            try:
                tree = str(parser.parse_sql_json(text))
            except parser.ParseError:
                size *= 2
                continue
        items = json.loads(tree).get("stmts", [])
        if end < total and not _ends_at_semicolon(text, items):
            size *= 2
            continue
        yield start, text, tree, items
        start, size = end, PIECE_CHARS


def _ends_at_semicolon(text: str, items: list[Any]) -> bool:
    if not items:
        return True
    last = items[-1]
    length = last.get("stmt_len", 0)
    if not length:
        return False
    return text.encode()[last.get("stmt_location", 0) + length :].strip() == b";"


def parse(script: str, each: Callable[[Statement], Statement] | None = None) -> ParsedScript:
    """Every statement of `script` with its first line (and its tree checksum); raises
    `SQLSyntaxError`. `each`, when given, sees every statement (with its parse node) as soon
    as it is read and returns what to keep of it: a big file's trees never pile up."""
    statements: list[Statement] = []
    kept: str | None = None
    line = 1  # the line at the start of the current piece
    for offset, text, tree, items in _pieces(script):
        data = text.encode()
        position, previous_end = 0, 0  # byte offsets in the piece, moving forward only
        for item in items:
            start = item.get("stmt_location", 0)
            length = item.get("stmt_len", 0)
            raw = data[start : start + length] if length else data[start:]
            lead = len(raw) - len(raw.lstrip())
            line += data.count(b"\n", position, start + lead)
            position = start + lead
            ((kind, node),) = item["stmt"].items()
            above = _comments_above(data[previous_end:start], bool(offset or previous_end))
            statement = Statement(raw.decode().strip(), line, kind, node, above)
            statements.append(each(statement) if each else statement)
            previous_end = start + (length or len(raw))
        line += data.count(b"\n", position)
        if offset == 0 and len(text) == len(script):
            kept = tree  # the file is one piece: its checksum is computed when asked for
    if kept is not None or not script:
        return ParsedScript(statements, kept)
    return ParsedScript(statements, None, script)


def _comments_above(gap: bytes, after_statement: bool) -> str:
    """The comments of the text between two statements, from the line after the previous
    statement's end (a comment on that line is about the previous statement)."""
    if b"--" not in gap and b"/*" not in gap:
        return ""
    if after_statement:
        gap = gap.split(b"\n", 1)[1] if b"\n" in gap else b""
    return gap.decode(errors="replace").strip()


def _stripped_statements(tree_json: str) -> Iterator[str]:
    for item in json.loads(_LOCATION.sub("", tree_json)).get("stmts", []):
        yield json.dumps(item["stmt"], sort_keys=True)


def _digest(tree_json: str) -> str:
    tree = ", ".join(_stripped_statements(tree_json))
    return hashlib.sha256(f"[{tree}]".encode()).hexdigest()


def parse_script(script: str) -> list[Statement]:
    """Every statement of `script` with its first line; raises `SQLSyntaxError`."""
    return parse(script).statements


def parse_tree(script: str) -> list[Any]:
    """The parse tree of `script` without source locations: equal for two scripts exactly when
    PostgreSQL reads the same statements from both (comments, whitespace, keyword case aside)."""
    return [item["stmt"] for item in json.loads(_LOCATION.sub("", _parse_json(script)))["stmts"]]


def tree_checksum(script: str) -> str:
    """SHA-256 of `parse_tree(script)` as sorted JSON: unchanged by cosmetic edits. The same
    digest towerctl has recorded in the ledger since the column was added."""
    return parse(script).tree_checksum


def is_transaction_control(statement: Statement) -> bool:
    return statement.kind == "TransactionStmt"


def copy_with_client(statement: Statement) -> str | None:
    """'FROM STDIN' / 'TO STDOUT' when a COPY needs the client's data stream."""
    node = statement.node
    if statement.kind == "CopyStmt" and not node.get("filename") and not node.get("is_program"):
        return "FROM STDIN" if node.get("is_from") else "TO STDOUT"
    return None


def needs_no_transaction(statement: Statement) -> bool:
    """Whether PostgreSQL refuses this statement inside a transaction block."""
    kind, node = statement.kind, statement.node
    if kind in _NEEDS_NO_TRANSACTION:
        return True
    if kind in ("IndexStmt", "DropStmt"):
        return bool(node.get("concurrent"))
    if kind == "ReindexStmt":
        return _has_option(node.get("params"), "concurrently")
    return False


def _has_option(params: Any, name: str) -> bool:
    for item in params or ():
        option = item.get("DefElem")
        if option is not None and option.get("defname") == name:
            arg = option.get("arg")
            if arg is None:
                return True
            value = arg.get("String", {}).get("sval", "true") if isinstance(arg, dict) else "true"
            return str(value) != "false"
    return False


def rerunnable(statement: Statement) -> bool:
    """Whether running the statement a second time changes nothing more than the first did:
    the rule for no-transaction files, whose failures cannot be rolled back."""
    kind, node = statement.kind, statement.node
    if kind == "IndexStmt":
        return bool(node.get("concurrent") and node.get("if_not_exists"))
    if kind == "DropStmt":
        return bool(node.get("concurrent") and node.get("missing_ok"))
    if kind == "ReindexStmt":
        return _has_option(node.get("params"), "concurrently")
    if kind == "VacuumStmt":
        return True
    if kind == "AlterEnumStmt":
        return bool(node.get("newVal") and node.get("skipIfNewValExists"))
    if kind == "SelectStmt":
        return not node.get("intoClause") and not node.get("lockingClause") and not _writes(node)
    return False


def _writes(select: dict[str, Any]) -> bool:
    ctes = (select.get("withClause") or {}).get("ctes") or ()
    return any(
        "CommonTableExpr" in cte and "SelectStmt" not in cte["CommonTableExpr"].get("ctequery", {})
        for cte in ctes
    )
