"""Clearing a session's history: delete its messages, keep its requests and ledger,
and record when and by which token, so `doctor` can tell a cleared history from
a lost message."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

from towerctl.requests import SessionLock

if TYPE_CHECKING:
    import psycopg

CLEAR = """
WITH gone AS (
    DELETE FROM session_messages WHERE session_id = %(sid)s RETURNING 1
)
INSERT INTO session_history_clears
    (session_id, macaroon_identifier, messages_deleted, last_request_id)
SELECT %(sid)s, %(who)s, (SELECT count(*) FROM gone),
       (SELECT max(id) FROM session_requests WHERE session_id = %(sid)s)
RETURNING messages_deleted"""


def clear_history(
    conn: psycopg.Connection, session_id: UUID, macaroon_identifier: str, wait_seconds: float
) -> int:
    """Delete the messages in one statement, between requests; returns how many."""
    with SessionLock(conn, session_id, wait_seconds):
        row = conn.execute(CLEAR, {"sid": session_id, "who": macaroon_identifier}).fetchone()
    return int(row[0]) if row else 0
