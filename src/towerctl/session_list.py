"""`session list`: sessions newest first (by creation or by last activity), filtered by
state and creation time, a page at a time (SPEC 16).

The cursor is the last listed session's id; the next page holds the sessions after it in
the same order, `(key, id) < (its key, its id)`, so a page is a bounded range read and
sessions opened meanwhile never shift it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.errors import BadInput, NotFound
from towerctl.session_ids import SessionRef, resolve
from towerctl.sessions import READ_COLUMNS, STATE_NOW, STATES, Session

if TYPE_CHECKING:
    import psycopg

MAX_PAGE = 10_000
SORT_KEYS = {"created": "created_at", "activity": "last_activity_at"}


def _page_query(key: str) -> str:
    return f"""
SELECT {READ_COLUMNS} FROM sessions
WHERE (%(state)s::text IS NULL OR {STATE_NOW} = %(state)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
  AND (%(after)s::uuid IS NULL
       OR ({key}, id) < (SELECT {key}, id FROM sessions WHERE id = %(after)s))
ORDER BY {key} DESC, id DESC
LIMIT %(limit)s"""


PAGE = {sort: _page_query(key) for sort, key in SORT_KEYS.items()}
EXISTS = "SELECT 1 FROM sessions WHERE id = %s"


@dataclass(frozen=True)
class SessionPage:
    sessions: tuple[Session, ...]
    next_cursor: UUID | None

    def as_json(self) -> dict[str, Any]:
        return {
            "sessions": [s.as_json() for s in self.sessions],
            "nextCursor": str(self.next_cursor) if self.next_cursor else None,
        }


def list_page(
    conn: psycopg.Connection,
    *,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    sort: str = "created",
    limit: int = 50,
    after: SessionRef | UUID | None = None,
) -> SessionPage:
    """One page of sessions, newest first by `sort` (created or activity)."""
    if state is not None and state not in STATES:
        raise BadInput(f"--state must be one of {', '.join(STATES)}, got {state!r}")
    if sort not in SORT_KEYS:
        raise BadInput(f"--sort must be one of {', '.join(SORT_KEYS)}")
    if not 1 <= limit <= MAX_PAGE:
        raise BadInput(f"--limit must be from 1 to {MAX_PAGE}")
    if since is not None and until is not None and since >= until:
        raise BadInput("--since must be before --until")
    cursor = None
    if after is not None:
        cursor = resolve(conn, after)
        if conn.execute(EXISTS, (cursor,)).fetchone() is None:
            raise NotFound(f"no session {cursor} (the --after cursor)")
    params = {
        "state": state,
        "since": since,
        "until": until,
        "after": cursor,
        "limit": limit + 1,
    }
    rows = conn.execute(PAGE[sort], params).fetchall()
    found = tuple(Session(*r) for r in rows[:limit])
    more = len(rows) > limit
    return SessionPage(found, found[-1].id if more and found else None)
