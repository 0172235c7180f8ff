"""Purging expired histories (`session purge --expired-for DURATION`).

A session has been expired for at least D when `expires_at <= now() - D` (a
session is expired once `expires_at` has passed, whether or not a write has
recorded the state yet; an expired session never comes back, so its
`expires_at` stays put). Its messages are deleted; its requests and ledger stay.

- Batches. Each statement deletes at most `BATCH` messages of one session (the
  oldest first, a range of its primary key) and commits on its own (the
  connection is autocommit): no lock is held for longer than one batch, nothing
  waits on a request (no lease or lock is taken: requests of other sessions
  never meet the purge, and an expired session takes no new request), and a
  purge killed part way has lost nothing but time. Running it again finds what
  is left.
- Records. The statement that deletes a batch also records it in
  `session_history_clears`, as `clear-history` does, with `macaroon_identifier`
  = 'purge' (real identifiers start with `towerctl1 `): the first batch of a
  session adds a row naming the session's last request; later batches (in this
  run or a re-run after a kill) add their count to that row while it is still
  the session's latest record for the same last request. So at every commit the
  record covers every request whose messages are gone, and `doctor` tells a
  purged history from lost messages.
- A request already in flight when its session expired may still write its
  messages after the purge; they stay until the next purge (and their request is
  newer than the record, so `doctor` expects them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    import psycopg

BATCH = 5_000  # messages per statement (one short transaction each)
SESSIONS_PAGE = 500  # sessions read per step of the walk
PURGE_IDENTIFIER = "purge"  # session_history_clears.macaroon_identifier of a purge

EXPIRED_FOR = "expires_at <= now() - %(age)s::interval"
# Sessions expired long enough that still hold messages, in id order from a cursor.
CANDIDATES = f"""
SELECT s.id FROM sessions s
WHERE {EXPIRED_FOR} AND s.id > %(after)s
  AND EXISTS (SELECT 1 FROM session_messages m WHERE m.session_id = s.id)
ORDER BY s.id LIMIT %(page)s"""
COUNT = f"""
SELECT count(DISTINCT m.session_id), count(*)
FROM sessions s JOIN session_messages m ON m.session_id = s.id
WHERE {EXPIRED_FOR}"""
# One batch: delete the session's oldest messages (at most %(batch)s, only while the
# session is still expired long enough) and record it, in one statement.
PURGE_BATCH = f"""
WITH doomed AS (
    SELECT id FROM session_messages
    WHERE session_id = %(sid)s
      AND EXISTS (SELECT 1 FROM sessions WHERE id = %(sid)s AND {EXPIRED_FOR})
    ORDER BY id LIMIT %(batch)s
), gone AS (
    DELETE FROM session_messages m USING doomed
    WHERE m.session_id = %(sid)s AND m.id = doomed.id
    RETURNING 1
), n AS (
    SELECT count(*) AS n FROM gone
), last_request AS (
    SELECT max(id) AS id FROM session_requests WHERE session_id = %(sid)s
), latest AS (
    SELECT id, macaroon_identifier, last_request_id FROM session_history_clears
    WHERE session_id = %(sid)s ORDER BY id DESC LIMIT 1
), added_to AS (
    UPDATE session_history_clears c
    SET messages_deleted = c.messages_deleted + n.n, cleared_at = now()
    FROM n, latest, last_request
    WHERE c.session_id = %(sid)s AND c.id = latest.id AND n.n > 0
      AND latest.macaroon_identifier = '{PURGE_IDENTIFIER}'
      AND latest.last_request_id IS NOT DISTINCT FROM last_request.id
    RETURNING c.id
), recorded AS (
    INSERT INTO session_history_clears
        (session_id, macaroon_identifier, messages_deleted, last_request_id)
    SELECT %(sid)s, '{PURGE_IDENTIFIER}', n.n, last_request.id
    FROM n, last_request
    WHERE n.n > 0 AND NOT EXISTS (SELECT 1 FROM added_to)
)
SELECT n FROM n"""

# (sessions purged so far, messages deleted so far, messages to delete in all)
Progress = Callable[[int, int, int], None]


@dataclass(frozen=True)
class Purged:
    sessions: int
    messages: int
    dry_run: bool

    def as_json(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "messages": self.messages, "dryRun": self.dry_run}


def count(conn: psycopg.Connection, expired_for: timedelta) -> Purged:
    """What a purge would delete now (`--dry-run`)."""
    row = conn.execute(COUNT, {"age": expired_for}).fetchone()
    sessions, messages = (int(row[0]), int(row[1])) if row else (0, 0)
    return Purged(sessions, messages, dry_run=True)


def purge(
    conn: psycopg.Connection,
    expired_for: timedelta,
    *,
    batch: int = BATCH,
    progress: Progress | None = None,
) -> Purged:
    """Delete the messages of sessions expired for at least `expired_for`, batch by
    batch (each its own transaction); returns how many sessions and messages."""
    if conn.info.transaction_status != 0:  # psycopg.pq.TransactionStatus.IDLE
        raise RuntimeError("purge needs an autocommit connection outside a transaction")
    total = count(conn, expired_for).messages if progress is not None else 0
    sessions = messages = 0
    after = UUID(int=0)
    while True:
        params = {"age": expired_for, "after": after, "page": SESSIONS_PAGE}
        page = [row[0] for row in conn.execute(CANDIDATES, params).fetchall()]
        if not page:
            break
        for session_id in page:
            deleted = _purge_session(conn, session_id, expired_for, batch, progress,
                                     (sessions, messages, total))  # fmt: skip
            if deleted:
                sessions += 1
                messages += deleted
        after = page[-1]
    if progress is not None:
        progress(sessions, messages, max(total, messages))
    return Purged(sessions, messages, dry_run=False)


def _purge_session(
    conn: psycopg.Connection,
    session_id: UUID,
    expired_for: timedelta,
    batch: int,
    progress: Progress | None,
    so_far: tuple[int, int, int],
) -> int:
    deleted = 0
    params = {"sid": session_id, "age": expired_for, "batch": batch}
    while True:
        row = conn.execute(PURGE_BATCH, params).fetchone()
        done = int(row[0]) if row else 0
        deleted += done
        if progress is not None and done:
            sessions, messages, total = so_far
            progress(sessions, messages + deleted, total)
        if done < batch:
            return deleted
