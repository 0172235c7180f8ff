"""The requests of one batch on one session (`RequestChain`).

One lease owner throughout. A write may keep the lease for the next request together
with what that request needs (state, balance, history), so it starts without a round
trip. A kept lease is given back when the chain ends (`with chain.lease:`), or runs
out on its own.

With an instant agent (echo) a write may also run *ahead*: it is sent without waiting
for its row while the next request is prepared (its context, the agent, its cost) from the
start that write will leave if it keeps the lease, as the write's own rules say it
(`Start` guessed by the caller). That request's write is sent only after the one
before it is finished and its start proved exactly the guess; otherwise the request
is prepared again from the start the server returned. So the writes reaching the
server are the same, in the same order, as without running ahead; one write at most
is in flight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.db import flush_sent, results_of_query_in_flight
from towerctl.lease import SessionLease

if TYPE_CHECKING:
    import psycopg

History = list[tuple[str, str, int]]  # (role, content, tokens), newest first
Start = tuple[str, int, History]  # state, balance, history: what a request starts from

# A commit that waits for the disk waits for every commit before it. The server waits
# only when the transaction wrote WAL (an id alone writes none: its commit would not
# wait), so a burst is settled by a write that changes nothing: the session row again.
SETTLE = "UPDATE sessions SET last_activity_at = last_activity_at WHERE id = %s"


class RequestChain:
    def __init__(self, lease: SessionLease[None], *, ahead: bool = False) -> None:
        self.lease = lease
        self.ahead = ahead  # writes that do not wait for the disk may run ahead
        self.next_start: Start | None = None
        # whether the next write waits for the disk, and whether one that did not is
        # not yet known to be on disk (the batch decides, `batch.Outbox`)
        self.durable = True
        self.unsettled = False
        self.done: list[Any] = []  # outcomes of writes that ran ahead, oldest first
        self._receive: Callable[[], Any] | None = None
        self._finish: Callable[[Any], Any] | None = None
        self._guess: Start | None = None
        self._used: Start | None = None

    def kept_start(self) -> Start | None:
        """What the previous write read (or, while it runs ahead, will read) for this
        request, while its lease is surely ours."""
        if self._finish is not None:
            if self._guess is not None:
                self._used, self._guess = self._guess, None
                return self._used
            self.catch_up()
        start, self.next_start = self.next_start, None
        return start if start is not None and self.lease.still_kept() else None

    def run_ahead(
        self,
        send: Callable[[], Callable[[], Any]],
        finish: Callable[[Any], Any],
        guess: Start | None,
    ) -> None:
        """Send a write without waiting for it: `send()` returns the call that reads its
        row; `finish(row)` turns the row into the outcome at `catch_up`; `guess` is the
        start the write leaves for the next request."""
        self._receive = send()
        self._finish, self._guess = finish, guess

    def catch_up(self) -> bool:
        """Finish the write that runs ahead, if any (its outcome joins `done`); False when
        the start guessed for the request after it proved wrong."""
        if self._finish is None:
            return True
        assert self._receive is not None
        row = self._receive()  # kept until it returns: `drain` reads an interrupted one
        finish, self._finish, self._guess, self._receive = self._finish, None, None, None
        used, self._used = self._used, None
        self.done.append(finish(row))
        if used is None:
            return True
        if self.next_start == used and self.lease.still_kept():
            self.next_start = None  # taken by the request that guessed it
            return True
        return False

    def in_flight(self) -> bool:
        return self._receive is not None

    def drain(self) -> None:
        """Read a write still running ahead to its end (its outcome is lost: the batch is
        stopping), so that the connection can be used again."""
        if self._receive is not None:
            receive, self._receive, self._finish = self._receive, None, None
            with contextlib.suppress(Exception):
                receive()

    def settle(self) -> None:
        """Return once every write of the chain is on disk."""
        self.catch_up()
        if self.unsettled:
            self.lease.conn.execute(SETTLE, (self.lease.session_id,))
            self.unsettled = False


# A write that changes nothing and waits for the disk, off the chain's own rows: a lock
# on a request row the chain has written (taking it gives the transaction an id and a WAL
# record, so its commit waits for the disk, and every commit before it is then there
# too). Nothing the chain writes next waits for that lock, as it would for the session
# row's (`SETTLE`): the chain goes on writing while this commit waits.
SETTLE_BESIDE = (
    b"SELECT 1 FROM session_requests WHERE session_id = $1::uuid AND id = $2::bigint FOR KEY SHARE"
)


class Settler:
    """Settles a chain's writes beside it, on a second connection of its own, so the
    chain's connection need not wait for the disk at the end of every burst. One settle
    at a time, sent without waiting (`start`) and read when done (`poll`, `wait`). An
    optimisation only: once the second connection fails (or cannot be opened) it is
    not used again, and the caller settles on the chain's connection (`RequestChain.settle`)."""

    def __init__(self, connect: Callable[[], psycopg.Connection]) -> None:
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self.usable = True
        self.running = False

    def start(self, session_id: UUID, request_id: int) -> bool:
        """Send a settle for every write committed so far; False when it cannot be."""
        assert not self.running
        if not self.usable:
            return False
        try:
            if self._conn is None:
                self._conn = self._connect()
            pgconn = self._conn.pgconn
            pgconn.send_query_params(SETTLE_BESIDE, [str(session_id).encode(), b"%d" % request_id])
            flush_sent(pgconn)
        except Exception:
            self._fail()
            return False
        self.running = True
        return True

    def poll(self) -> bool | None:
        """Whether the settle in flight is done: None while it runs, False if it failed."""
        assert self._conn is not None and self.running
        pgconn = self._conn.pgconn
        try:
            pgconn.consume_input()
            if pgconn.is_busy():
                return None
        except Exception:
            return self._fail()
        return self._read()

    def wait(self) -> bool:
        """Wait for the settle in flight: True once it is on disk, False if it failed."""
        assert self._conn is not None and self.running
        return self._read()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        self.running = False

    def _read(self) -> bool:
        from psycopg import pq

        assert self._conn is not None
        try:
            results = results_of_query_in_flight(self._conn)
        except Exception:
            return self._fail()
        self.running = False
        # One row locked, or its commit wrote no WAL and waited for nothing.
        ok = pq.ExecStatus.TUPLES_OK
        if not results or any(r.status != ok for r in results) or results[0].ntuples != 1:
            return self._fail()
        if self._conn.pgconn.status != pq.ConnStatus.OK:
            return self._fail()
        return True

    def _fail(self) -> bool:
        self.usable = False
        self.close()
        return False
