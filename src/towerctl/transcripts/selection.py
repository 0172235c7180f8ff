"""A session's message history: selections, paging and the SQL that reads them.

Machine formats (json, ndjson, csv) are produced by PostgreSQL itself through
`COPY (SELECT ...) TO STDOUT` (`copy_query`), so a million-message export streams
at close to COPY's own speed in constant memory. The people formats (table,
markdown) read rows through a server-side (named) cursor (`rows_query`). Running
the queries, and closing what they open, is `towerctl.transcripts.export`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from towerctl.errors import BadInput, NotFound

CHUNK_ROWS = 2_000
ROLES = ("user", "assistant")
MAX_PAGE = 10_000_000  # --limit and --last
ISO_UTC = """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""
# The state of the request a message belongs to (complete, rejected, failed): a reader
# tells a refusal or an agent's error from a real answer. One primary-key probe per row,
# in the row's own order, so an export stays a stream.
REQUEST_STATE = (
    "(SELECT r.state FROM session_requests r WHERE r.session_id = session_messages.session_id"
    " AND r.id = session_messages.session_request_id)"
)
MESSAGE_JSON = (
    """'{"id":' || id || ',"role":' || to_json(role)::text"""
    """ || ',"content":' || to_json(content)::text"""
    """ || ',"sessionRequestId":' || session_request_id"""
    """ || ',"createdAt":"' || """ + ISO_UTC + """ || '"'"""
    """ || ',"requestState":' || coalesce(to_json(""" + REQUEST_STATE + """)::text, 'null')"""
    """ || '}'"""
)
FILTER = """
FROM session_messages
WHERE session_id = %(sid)s
  AND (%(after)s::bigint IS NULL OR id > %(after)s)
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
  AND (%(role)s::text IS NULL OR role = %(role)s)"""
PAGE = "ORDER BY id LIMIT %(limit)s"
PAGE_PROBE = f"SELECT ARRAY(SELECT id {FILTER} ORDER BY id LIMIT 2 OFFSET %(offset)s)"
COUNT = f"SELECT count(*) FROM (SELECT 1 {FILTER} ORDER BY id LIMIT %(limit)s) t"
# The first id of the selection's last N messages (a backward scan of the primary key).
TAIL_START = f"SELECT min(id) FROM (SELECT id {FILTER} ORDER BY id DESC LIMIT %(last)s) t"
CURSOR_EXISTS = "SELECT 1 FROM session_messages WHERE session_id = %s AND id = %s"
# CSV: a content cell a spreadsheet would run as a formula (leading =, +, -, @, tab or
# carriage return) gets a leading single quote, as OWASP advises; `--raw` turns it off.
FORMULA_STARTS = "=+-@\t\r"
CSV_CONTENT = (
    "CASE WHEN left(content, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r')"
    " THEN '''' || content ELSE content END"
)


class Format(StrEnum):
    table = "table"
    json = "json"
    ndjson = "ndjson"
    csv = "csv"
    markdown = "markdown"


@dataclass(frozen=True)
class Message:
    """One message; `content` may be cut (`rows_query`): `length` is its full length."""

    id: int
    role: str
    content: str
    session_request_id: int
    created_at: datetime
    length: int = 0
    request_state: str | None = None  # its request's: complete, rejected or failed

    @property
    def not_an_answer(self) -> bool:
        """An assistant message that tells of a refusal or a failure, not a result."""
        return self.role == "assistant" and self.request_state in ("rejected", "failed")

    @property
    def cut(self) -> int:
        """How many characters of the content were left out (0: it is whole)."""
        return max(self.length - len(self.content), 0)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "sessionRequestId": self.session_request_id,
            "createdAt": self.created_at,
            "requestState": self.request_state,
        }


@dataclass(frozen=True)
class Selection:
    """Which messages of a session: `after < id < before`, optionally one role; then at most
    the first `limit` of them or the last `last` (never both)."""

    session_id: UUID
    after: int | None = None
    before: int | None = None
    role: str | None = None
    limit: int | None = None
    last: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            "sid": self.session_id,
            "after": self.after,
            "before": self.before,
            "role": self.role,
            "limit": self.limit,  # NULL = no limit
        }


def check_selection(conn: psycopg.Connection, selection: Selection) -> None:
    """Refuse bad paging input (exit 2) and unknown cursors (exit 4)."""
    if selection.role is not None and selection.role not in ROLES:
        raise BadInput(f"--role must be user or assistant, got {selection.role!r}")
    if selection.limit is not None and not 1 <= selection.limit <= MAX_PAGE:
        raise BadInput(f"--limit must be from 1 to {MAX_PAGE:,}")
    if selection.last is not None and not 1 <= selection.last <= MAX_PAGE:
        raise BadInput(f"--last must be from 1 to {MAX_PAGE:,}")
    if selection.limit is not None and selection.last is not None:
        raise BadInput("--limit and --last cannot be used together")
    for flag, cursor in (("--after", selection.after), ("--before", selection.before)):
        if cursor is None:
            continue
        if cursor < 1:
            raise BadInput(f"{flag} must be a message id (a positive whole number)")
        if conn.execute(CURSOR_EXISTS, (selection.session_id, cursor)).fetchone() is None:
            raise NotFound(f"{flag} {cursor}: no such message in this session")


def tail(conn: psycopg.Connection, selection: Selection) -> Selection:
    """The selection with `--last N` turned into a lower bound: the same messages, read
    forward. Run it in the snapshot that reads the page, so the tail is the page's tail.

    The page is the end of the selection, so nothing of the selection follows it and its
    `nextCursor` is null, as for a `--limit` page that reaches the end (`--before`
    included: it is part of the selection, as it is for `--limit`)."""
    if selection.last is None:
        return selection
    row = conn.execute(TAIL_START, selection.params() | {"last": selection.last}).fetchone()
    start = row[0] if row else None
    if start is None:
        return replace(selection, last=None)  # the selection is empty: so is its tail
    return replace(selection, after=int(start) - 1, last=None)


def next_cursor(conn: psycopg.Connection, selection: Selection) -> int | None:
    """The last id of this page when more messages follow it; None at the end."""
    if selection.limit is None:
        return None
    row = conn.execute(PAGE_PROBE, selection.params() | {"offset": selection.limit - 1}).fetchone()
    ids = row[0] if row else []
    return int(ids[0]) if len(ids) == 2 else None


def count(conn: psycopg.Connection, selection: Selection) -> int:
    row = conn.execute(COUNT, selection.params()).fetchone()
    return int(row[0]) if row else 0


def rows_query(cell_chars: int | None = None) -> str:
    """Rows for the people formats through a named cursor: `content` cut to `cell_chars`
    in SQL (None: whole) with its full `length`, so a huge message never travels whole."""
    content = "content" if cell_chars is None else f"left(content, {int(cell_chars)})"
    return (
        f"SELECT id, role, {content}, session_request_id, created_at, length(content),"
        f" {REQUEST_STATE} {FILTER} {PAGE}"
    )


def copy_query(selection: Selection, fmt: Format, *, raw: bool = False) -> sql.Composed:
    """`COPY (SELECT ...) TO STDOUT`: one JSON object per line (json, ndjson), or CSV
    with a header row, formula cells neutralised unless `raw`."""
    params = {k: sql.Literal(v) for k, v in selection.params().items()}
    where = sql.SQL(FILTER.replace("%(", "{").replace(")s", "}")).format(**params)
    page = sql.SQL("ORDER BY id LIMIT {limit}").format(limit=params["limit"])
    if fmt is Format.csv:
        content = "content" if raw else CSV_CONTENT
        columns = (
            f"id, role, {content} AS content, "
            'session_request_id AS "sessionRequestId", '
            + ISO_UTC
            + ' AS "createdAt", '
            + REQUEST_STATE
            + ' AS "requestState"'
        )
        options = "FORMAT csv, HEADER"
    elif fmt in (Format.json, Format.ndjson):
        # CSV mode with a quote and delimiter that JSON text never contains: lines verbatim.
        columns = MESSAGE_JSON
        options = "FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02'"
    else:
        raise ValueError(f"the {fmt} format is not produced by COPY")
    return sql.Composed(
        [
            sql.SQL("COPY (SELECT "),
            sql.SQL(columns),
            sql.SQL(" "),
            where,
            sql.SQL(" "),
            page,
            sql.SQL(f") TO STDOUT WITH ({options})"),
        ]
    )
