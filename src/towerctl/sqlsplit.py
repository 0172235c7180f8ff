"""Split a SQL script into statements, each with the line it starts on.

Understands the lexical parts of PostgreSQL that can hide a semicolon: quoted
strings ('…', E'…' with backslash escapes), quoted identifiers, dollar-quoted
bodies ($$…$$, $tag$…$tag$), line comments and nested block comments.
`BEGIN ATOMIC … END` function bodies are not supported: use a dollar-quoted body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*)?\$")


@dataclass(frozen=True)
class Statement:
    text: str
    line: int  # 1-based line of the statement's first character in the script

    def line_of(self, position: int) -> int:
        """The script line of a 1-based character position within this statement."""
        return self.line + self.text[: max(position - 1, 0)].count("\n")


class UnterminatedSQL(ValueError):
    def __init__(self, what: str, line: int) -> None:
        super().__init__(f"unterminated {what} starting at line {line}")
        self.line = line


def _is_ident_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or ch == "$"


def split_statements(script: str) -> list[Statement]:
    statements: list[Statement] = []
    i, n = 0, len(script)
    start: int | None = None

    def line_at(index: int) -> int:
        return script.count("\n", 0, index) + 1

    while i < n:
        ch = script[i]
        nxt = script[i + 1] if i + 1 < n else ""
        if ch == "-" and nxt == "-":
            end = script.find("\n", i)
            i = n if end == -1 else end + 1
            continue
        if ch == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if script.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif script.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise UnterminatedSQL("block comment", line_at(i))
            i = j
            continue
        if ch.isspace():
            i += 1
            continue
        if ch == ";":
            if start is not None:
                statements.append(Statement(script[start:i].rstrip(), line_at(start)))
            start = None
            i += 1
            continue
        if start is None:
            start = i
        if ch == "'":
            escapes = (
                i > 0 and script[i - 1] in "eE" and (i < 2 or not _is_ident_char(script[i - 2]))
            )
            i = _skip_quoted(script, i, "'", escapes, "string")
            continue
        if ch == '"':
            i = _skip_quoted(script, i, '"', False, "quoted identifier")
            continue
        if ch == "$" and (i == 0 or not _is_ident_char(script[i - 1])):
            match = _DOLLAR_TAG.match(script, i)
            if match:
                tag = match.group(0)
                end = script.find(tag, match.end())
                if end == -1:
                    raise UnterminatedSQL("dollar-quoted string", line_at(i))
                i = end + len(tag)
                continue
        i += 1
    if start is not None and script[start:].strip():
        statements.append(Statement(script[start:].rstrip(), line_at(start)))
    return statements


def _skip_quoted(script: str, i: int, quote: str, escapes: bool, what: str) -> int:
    j, n = i + 1, len(script)
    while j < n:
        c = script[j]
        if escapes and c == "\\":
            j += 2
            continue
        if c == quote:
            if j + 1 < n and script[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    raise UnterminatedSQL(what, script.count("\n", 0, i) + 1)
