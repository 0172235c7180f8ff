"""The requests of one batch on one session (`RequestChain`).

One lease owner throughout. A write may keep the lease for the next request together
with what that request needs (state, balance, history), so it starts without a round
trip. A kept lease is given back when the chain ends (`with chain.lease:`), or runs
out on its own.

With an instant agent (echo) a write may also run *ahead*: it is sent from a worker
thread while the next request is prepared (its context, the agent, its cost) from the
start that write will leave if it keeps the lease, as the write's own rules say it
(`Start` guessed by the caller). That request's write is sent only after the one
before it is finished and its start proved exactly the guess; otherwise the request
is prepared again from the start the server returned. So the writes reaching the
server are the same, in the same order, as without running ahead; one write at most
is in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from towerctl.lease import SessionLease

History = list[tuple[str, str, int]]  # (role, content, tokens), newest first
Start = tuple[str, int, History]  # state, balance, history: what a request starts from

# A commit that waits for the disk waits for every commit before it: a transaction with
# an id of its own (and nothing else) settles a burst of writes that did not wait.
SETTLE = "SELECT pg_current_xact_id()"


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
        self._worker: _Worker | None = None
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
        self, call: Callable[[], Any], finish: Callable[[Any], Any], guess: Start | None
    ) -> None:
        """Start `call` (a write) on the worker; `finish(row)` turns its row into the
        outcome at `catch_up`; `guess` is the start it leaves for the next request."""
        if self._worker is None:
            self._worker = _Worker()
        self._finish, self._guess = finish, guess
        self._worker.submit(call)
        time.sleep(0)  # hand the worker the interpreter: it sends the write now

    def catch_up(self) -> bool:
        """Finish the write that runs ahead, if any (its outcome joins `done`); False when
        the start guessed for the request after it proved wrong."""
        if self._finish is None:
            return True
        finish, self._finish, self._guess = self._finish, None, None
        used, self._used = self._used, None
        assert self._worker is not None
        self.done.append(finish(self._worker.result()))
        if used is None:
            return True
        if self.next_start == used and self.lease.still_kept():
            self.next_start = None  # taken by the request that guessed it
            return True
        return False

    def settle(self) -> None:
        """Return once every write of the chain is on disk."""
        self.catch_up()
        if self.unsettled:
            self.lease.conn.execute(SETTLE)
            self.unsettled = False


class _Worker:
    """One daemon thread that runs one call at a time (it never keeps the process
    alive: a batch that ends, however it ends, does not wait for it)."""

    def __init__(self) -> None:
        self._call: Callable[[], Any] | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        self._go, self._done = threading.Event(), threading.Event()
        threading.Thread(target=self._loop, name="towerctl-write", daemon=True).start()

    def submit(self, call: Callable[[], Any]) -> None:
        self._call = call
        self._done.clear()
        self._go.set()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._result

    def _loop(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            call, self._call = self._call, None
            try:
                assert call is not None
                self._result = call()
            except BaseException as error:  # handed to the caller of result()
                self._result, self._error = None, error
            self._done.set()
