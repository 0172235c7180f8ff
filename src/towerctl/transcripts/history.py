"""Clearing a session's history: delete its messages, keep its requests and ledger,
and record when and by which token, so `doctor` can tell a cleared history from
a lost message.

A clear takes the session's lease like a request (`lease`), so it never runs
between a request's reads and its write; the statement that deletes also gives
the lease back, and deletes nothing if the lease was lost meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.errors import NotServed
from towerctl.requests.lease import MARGIN_SECONDS, SessionLease

if TYPE_CHECKING:
    import psycopg

CLEAR = """
WITH held AS (
    UPDATE sessions SET lease_owner = NULL, lease_until = NULL
    WHERE id = %(sid)s AND lease_owner = %(me)s
    RETURNING id
), gone AS (
    DELETE FROM session_messages
    WHERE session_id = %(sid)s AND EXISTS (SELECT 1 FROM held)
    RETURNING 1
)
INSERT INTO session_history_clears
    (session_id, macaroon_identifier, messages_deleted, last_request_id)
SELECT held.id, %(who)s, (SELECT count(*) FROM gone),
       (SELECT max(id) FROM session_requests WHERE session_id = %(sid)s)
FROM held
RETURNING messages_deleted"""


def clear_history(
    conn: psycopg.Connection, session_id: UUID, macaroon_identifier: str, wait_seconds: float
) -> int:
    """Delete the messages in one statement, between requests; returns how many."""
    lease: SessionLease = SessionLease(
        conn, session_id, hold_seconds=MARGIN_SECONDS, wait_seconds=wait_seconds
    )
    with lease:
        lease.take()
        params: dict[str, Any] = lease.params | {"who": macaroon_identifier}
        row = conn.execute(CLEAR, params).fetchone()
        lease.released()
    if row is None:
        raise NotServed(
            f"session {session_id}: the clear's lease ran out before it ran; nothing deleted",
            hint="retry",
        )
    return int(row[0])
