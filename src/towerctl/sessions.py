"""Sessions and their balance: open, show, list, top up, expire.

Every change of balance is a row in `balance_ledger` written by the same
statement that changes `sessions.balance_sats` (a top-up's: migration 0025's
function). Expiry (24 h without activity)
is computed by every read (a session past `expires_at` reads as expired) and
recorded by the next write to the session, so reads never write and run on a
read-only replica as well.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.errors import BadInput, NotFound, NotServed
from towerctl.session_ids import SessionRef, resolve

if TYPE_CHECKING:
    import psycopg

STATES = ("awaiting_payment", "active", "paused", "expired")
IDLE_LIFETIME = "24 hours"
COLUMNS = "id, state, balance_sats, created_at, expires_at, last_activity_at"
# What a reader sees: a session past its expiry is expired, whether or not a write
# has recorded it yet. Reads write nothing, so they run on a read-only replica too.
STATE_NOW = "CASE WHEN state <> 'expired' AND expires_at <= now() THEN 'expired' ELSE state END"
READ_COLUMNS = f"id, {STATE_NOW}, balance_sats, created_at, expires_at, last_activity_at"

SELECT_ONE = f"SELECT {READ_COLUMNS} FROM sessions WHERE id = %s"
SELECT_NEWEST = f"""
SELECT {READ_COLUMNS} FROM sessions
WHERE (%(state)s::text IS NULL OR {STATE_NOW} = %(state)s)
ORDER BY created_at DESC, id LIMIT %(limit)s"""
# The id is chosen here, not by the column's default, so that both rows name the
# session by value: a distributed store writes them on the one node that holds it.
OPEN = f"""
WITH s AS (
    INSERT INTO sessions (id, state, balance_sats, expires_at)
    VALUES (%(id)s, 'active', %(sats)s, now() + interval '{IDLE_LIFETIME}')
    RETURNING {COLUMNS}
), deposit AS (
    INSERT INTO balance_ledger (session_id, kind, amount_sats)
    VALUES (%(id)s, 'deposit', %(sats)s)
)
SELECT {COLUMNS} FROM s"""
# Migration 0025's function: the balance, the state, the expiry and the ledger row.
TOP_UP = "SELECT * FROM towerctl_top_up(%(id)s::uuid, %(sats)s::bigint)"


@dataclass(frozen=True)
class Session:
    id: UUID
    state: str
    balance_sats: int
    created_at: datetime
    expires_at: datetime
    last_activity_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "sessionId": str(self.id),
            "state": self.state,
            "balanceSats": self.balance_sats,
            "createdAt": self.created_at,
            "expiresAt": self.expires_at,
        }


def _session(row: tuple[Any, ...]) -> Session:
    return Session(*row)


def open_session(conn: psycopg.Connection, deposit_sats: int) -> Session:
    """A new `active` session holding `deposit_sats`, its deposit in the ledger."""
    row = conn.execute(OPEN, {"id": uuid.uuid4(), "sats": deposit_sats}).fetchone()
    assert row is not None
    return _session(row)


def resolve_id(conn: psycopg.Connection, ref: SessionRef | UUID) -> UUID:
    """A session's whole id from a UUID or a unique prefix (exit 4 none, exit 2 several)."""
    return resolve(conn, ref)


def get_session(conn: psycopg.Connection, session_id: SessionRef | UUID) -> Session:
    """The session as it stands now (expired once its time has come), or NotFound."""
    session_id = resolve(conn, session_id)
    row = conn.execute(SELECT_ONE, (session_id,)).fetchone()
    if row is None:
        raise NotFound(f"no session {session_id}")
    return _session(row)


def list_sessions(
    conn: psycopg.Connection, *, state: str | None = None, limit: int = 50
) -> list[Session]:
    """Newest first."""
    if state is not None and state not in STATES:
        raise BadInput(f"--state must be one of {', '.join(STATES)}, got {state!r}")
    if not 1 <= limit <= 10_000:
        raise BadInput("--limit must be from 1 to 10000")
    rows = conn.execute(SELECT_NEWEST, {"state": state, "limit": limit}).fetchall()
    return [_session(r) for r in rows]


def top_up(conn: psycopg.Connection, session_id: SessionRef | UUID, sats: int) -> Session:
    """Add `sats`; a paused session becomes active. An expired session takes nothing."""
    session_id = resolve(conn, session_id)
    row = conn.execute(TOP_UP, {"id": session_id, "sats": sats}).fetchone()
    if row is not None:
        return _session(row)
    session = get_session(conn, session_id)  # NotFound, or why it takes nothing
    raise NotServed(f"session {session.id} is {session.state} and takes no top-up")
