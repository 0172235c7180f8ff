"""The request guard: a lease on the session row.

At most one request (or history clear) per session is in flight (SPEC 6). The
guard is a lease written into the session row by one autocommit statement (the
plpgsql function `towerctl_take_lease`, migration 0025, also called by a request's
`towerctl_take_request`), in effect:

    UPDATE sessions SET lease_owner = me, lease_until = now() + hold
    WHERE id = sid AND (lease_until IS NULL OR lease_until < now())

It uses no session-level state of the server (no advisory lock, no SET), so it
guards the same through a transaction-pooling PgBouncer as on a direct
connection, and a process that dies frees the session when its lease runs out.
Every clock reading is the server's `now()`, never the client's.

- The lease lasts the agent's whole deadline plus `MARGIN_SECONDS`, so a live
  request never outlives it unless its final write is delayed that long.
- The final write of a request re-checks `lease_owner = me` in the same
  statement that records the outcome and releases the lease: a request whose
  lease ran out and was taken by another writes nothing (`LeaseLost`), so a lost
  lease never yields a debit without its request, or two concurrent debits.
- Every other way out releases it (`release`, in a `finally`), unless the
  connection itself is gone: then the lease runs out on its own.
- A second request polls with backoff for at most the busy wait
  (`TOWER_BUSY_WAIT`; 0 refuses at once) and is then refused as busy (exit 5),
  having written nothing.
- A batch's write may keep the lease for its next line (migration 0012); the
  batch trusts a kept lease only while `hold - KEPT_MARGIN_SECONDS` of it surely
  remain by its own clock (counted from before the write was sent), and takes it
  again otherwise. A waiter that will wait asks for the lease next
  (`lease_wanted_by/_until`, `WANT_SECONDS`): while the ask stands, no write keeps
  the lease and nobody else takes it, so a batch never starves other clients.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.errors import NotFound, NotServed

if TYPE_CHECKING:
    import psycopg


MARGIN_SECONDS = 5.0  # beyond the agent's deadline: reading, writing, starting the agent
FIRST_BACKOFF = 0.01
MAX_BACKOFF = 0.25
# How long a waiter's ask for the lease stands (longer than its longest pause between tries).
WANT_SECONDS = 1.0
# A kept lease is used without asking the server only while this much of it is left.
KEPT_MARGIN_SECONDS = 1.0

# The lease rule (migration 0025's function, shared with a request's take): one row,
# ('held', NULL) or ('busy', seconds the holder's lease or another waiter's ask still
# runs); none when there is no such session.
TAKE = """
SELECT * FROM towerctl_take_lease(
    %(sid)s::uuid, %(me)s::uuid, %(hold)s::float8, %(want)s::float8)"""
# Put before a retry (a test sees a waiter in pg_stat_activity by it).
WAITING = "/* towerctl: waiting for the session lease */"
RELEASE = """
UPDATE sessions SET lease_owner = NULL, lease_until = NULL
WHERE id = %(sid)s AND lease_owner = %(me)s"""


class LeaseLost(NotServed):
    """The lease ran out before the final write and another request holds it now."""


class SessionLease:
    """The lease of one request on one session; a context manager that releases it.

    `take()` takes it alone; `take_by(query, params)` takes it with one statement that
    also reads (a request's: `towerctl_take_request`, which applies the same rule). The
    final write should release the lease itself, in its own transaction, and then call
    `released()`.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        session_id: UUID,
        *,
        hold_seconds: float,
        wait_seconds: float,
    ) -> None:
        self.conn = conn
        self.session_id = session_id
        self.owner = uuid.uuid4()
        self.hold_seconds = hold_seconds
        self.wait_seconds = wait_seconds
        self.held = False
        self.kept_until = 0.0

    @property
    def params(self) -> dict[str, Any]:
        return {"sid": self.session_id, "me": self.owner, "hold": self.hold_seconds}

    def take(self) -> None:
        """Take the lease (a history clear's: nothing else read under it).

        NotFound when there is no such session; NotServed (busy) when another request
        held the lease for longer than the busy wait."""
        self.take_by(TAKE, self.params)

    def take_by(self, query: str, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The row of `query`, a statement that takes the lease and reads under it in one
        round trip (a function such as `towerctl_take_request`).

        Its row starts with the outcome and, when busy, the seconds the holder's lease
        still runs: `held` (ours now), `released` (taken and given back in the same
        transaction: nothing to write) or `busy` (retried until the busy wait is over,
        then NotServed); no row: no such session (NotFound)."""
        deadline = time.monotonic() + self.wait_seconds
        backoff = FIRST_BACKOFF
        sql = query
        while True:
            sent = time.monotonic()
            row = self.conn.execute(sql, {**params, **self._want(deadline)}).fetchone()
            if row is None:
                raise NotFound(f"no session {self.session_id}")
            if row[0] != "busy":
                self.held = row[0] == "held"
                self.kept_until = sent + self.hold_seconds - KEPT_MARGIN_SECONDS
                return tuple(row)
            backoff = self._wait(deadline, backoff, float(row[1]))
            sql = WAITING + query

    def _want(self, deadline: float) -> dict[str, float]:
        """How long to ask for the lease next when it is busy: only if we will wait."""
        return {"want": WANT_SECONDS if deadline > time.monotonic() else 0.0}

    def _wait(self, deadline: float, backoff: float, holder_left: float) -> float:
        """Sleep before the next try (no longer than the holder's lease has left, nor
        past the busy wait) and return the next backoff; NotServed once the wait is over."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotServed(
                f"session {self.session_id} is busy with another request",
                hint=f"waited {self.wait_seconds:g}s (TOWER_BUSY_WAIT); retry later",
            )
        time.sleep(max(min(backoff, left, holder_left + 0.001), 0.001))
        return min(backoff * 2, MAX_BACKOFF)

    def released(self) -> None:
        """The final write released the lease (or found it lost): nothing left to do."""
        self.held = False

    def kept(self, sent: float) -> None:
        """The final write, sent at monotonic time `sent`, kept the lease for another
        `hold_seconds` (a batch's next request starts without taking it)."""
        self.held = True
        self.kept_until = sent + self.hold_seconds - KEPT_MARGIN_SECONDS

    def still_kept(self) -> bool:
        """True while a kept lease is surely still ours: the server's deadline counts from
        after `sent` (our clock), less a margin; past it, take it again (`take_by`)."""
        return self.held and time.monotonic() < self.kept_until

    def release(self) -> None:
        """Give the lease back (only ours: a lease that ran out and was taken stays)."""
        if not self.held:
            return
        self.held = False
        if not self.conn.closed and not self.conn.broken:
            self.conn.execute(RELEASE, self.params)

    def __enter__(self) -> SessionLease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except Exception:
            if kind is None:
                raise
            # Already failing: the first error is the one to report; the lease runs out.


def hold_seconds(agent_name: str, agent_deadline: float) -> float:
    """How long a request's lease lasts: the agent's whole deadline and a margin.

    The echo agent answers in-process at once and has no deadline: the margin alone."""
    return (0.0 if agent_name == "echo" else agent_deadline) + MARGIN_SECONDS
