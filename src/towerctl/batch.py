"""A batch of session requests: NDJSON in, one outcome line per request out, in order.

Each line is one request (`session_requests.run_request`) under the session's lease.
A line's write may keep the lease for the next line, with what that line needs (so a
request costs one round trip, not two); it does not when another client waits for
the session (that client has asked for the lease, `lease`), so other clients'
requests interleave with a long batch rather than wait for all of it. The batch gives
a kept lease back when it ends, however it ends; a killed batch's runs out.

An outcome line is written only once its request is on disk. With an instant agent
(echo) and the next line already waiting, a write commits without waiting for the
disk; the burst ends (its last write waits for the disk, which covers every commit
before it) when the input pauses, at the end, or after `BURST_SECONDS` or
`BURST_LINES`, and its lines are written then (`Outbox`). With a second connection
(`Settler`) the disk is waited for there, beside the batch, which goes on writing
meanwhile; the lines are written when that wait ends. A stopped batch settles its
burst before it reports; when the database is gone it says how many lines were
recorded but not answered. Other agents take far longer than the disk: each of their
writes waits for it, as a single request's does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl import bounds
from towerctl.agents import Agent
from towerctl.config import Pricing, RequestLimits
from towerctl.db import classify
from towerctl.errors import BadInput, ExitCode, NotServed, TowerError, WriteFailed, error_for
from towerctl.lease import SessionLease, hold_seconds
from towerctl.request_chain import RequestChain, Settler
from towerctl.session_requests import serve_request, unrecorded_refusal

if TYPE_CHECKING:
    import psycopg

BATCH_KEYS = frozenset({"message", "idempotencyKey"})
# A burst's bounds: the longest a recorded line's outcome waits for the rest of it, and
# the most lines recorded without their outcome written (after a kill, at most these
# and the request in flight are recorded but unanswered).
BURST_SECONDS = 0.02
BURST_LINES = 32


@dataclass(frozen=True)
class BatchItem:
    message: str
    idempotency_key: str | None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise BadInput(f"the key {key[:40]!r} appears twice")
        seen[key] = value
    return seen


def parse_batch_line(raw: bytes, limits: RequestLimits) -> BatchItem | None:
    """One NDJSON batch line (without the line number in errors); None for a blank line.

    Refused (BadInput): invalid UTF-8 or JSON, nesting past the depth bound, anything
    but an object, a key other than "message" and "idempotencyKey" (a misspelt key
    must never make a retry charge twice), a repeated key, a non-string value."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadInput("not valid UTF-8") from None
    if not line:
        return None
    depth = bounds.JSON_DEPTH.whole_value()
    if not bounds.json_depth_within(raw, depth):
        raise BadInput(f"JSON nested deeper than {depth} levels")
    try:
        item = json.loads(line, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):
        raise BadInput("not valid JSON") from None
    if not isinstance(item, dict):
        raise BadInput('expected an object with a "message" string')
    unknown = sorted(set(item) - BATCH_KEYS)
    if unknown:
        raise BadInput(
            f"unknown key {unknown[0][:40]!r}: a line holds only "
            '"message" and "idempotencyKey" (nothing was run)'
        )
    if not isinstance(item.get("message"), str):
        raise BadInput('expected an object with a "message" string')
    key = item.get("idempotencyKey")
    if key is not None and not isinstance(key, str):
        raise BadInput('idempotencyKey must be a string (write a number as "7")')
    return BatchItem(item["message"], key)


@dataclass
class BatchSummary:
    """What a batch did so far: outcomes per state and the lines answered (written)."""

    counts: dict[str, int] = field(
        default_factory=lambda: {"complete": 0, "rejected": 0, "failed": 0}
    )
    answered: int = 0
    worst: ExitCode = ExitCode.OK

    def text(self) -> str:
        return ", ".join(f"{n} {state}" for state, n in self.counts.items())


def run_batch(
    conn: psycopg.Connection,
    session_id: UUID,
    lines: Iterable[bytes] | bounds.BoundedLines,
    agent: Agent,
    emit: Callable[[dict[str, Any]], None],
    *,
    reader_gone: Callable[[], bool] = lambda: False,
    pricing: Pricing | None = None,
    limits: RequestLimits | None = None,
    settle_beside: Callable[[], psycopg.Connection] | None = None,
) -> BatchSummary:
    """Serve NDJSON requests in order, handing each outcome to `emit` (one line each).

    Returns when every line completed; otherwise raises the error that carries the
    largest exit code among the lines. A malformed line stops the batch after the
    lines before it (exit 2). When the reader of the outcomes is gone (`reader_gone`
    before a line, or `emit` raising WriteFailed), the requests recorded stay recorded,
    no further line runs, and WriteFailed (exit 10) says how many lines were answered.
    `lines` raising `bounds.LineTooLong` is a line past the batch line bound (exit 2).
    `settle_beside` opens a second connection to the same database, on which an instant
    agent's bursts are settled while the batch goes on writing (`Settler`).
    """
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    chain = RequestChain(
        SessionLease(
            conn,
            session_id,
            hold_seconds=hold_seconds(agent.name, limits.agent_timeout_seconds),
            wait_seconds=limits.busy_wait_seconds,
        ),
        ahead=agent.instant,
    )
    settler = Settler(settle_beside) if agent.instant and settle_beside is not None else None
    with chain.lease:
        try:
            return _run(chain, settler, lines, agent, emit, reader_gone, pricing, limits)
        finally:
            chain.drain()  # before the lease is given back on the same connection
            if settler is not None:
                settler.close()


def _run(
    chain: RequestChain,
    settler: Settler | None,
    lines: Iterable[bytes] | bounds.BoundedLines,
    agent: Agent,
    emit: Callable[[dict[str, Any]], None],
    reader_gone: Callable[[], bool],
    pricing: Pricing,
    limits: RequestLimits,
) -> BatchSummary:
    summary = BatchSummary()
    outbox = Outbox(chain, emit, summary, settler)
    more_waiting = lines.ready if isinstance(lines, bounds.BoundedLines) else lambda: False
    numbered = enumerate(lines, start=1)
    number = 0
    try:
        while True:
            outbox.tend()
            if outbox.pending() and not (outbox.may_wait() and more_waiting()):
                outbox.settle()  # the input pauses or the burst is full: its lines go out
            try:
                number, raw = next(numbered)
            except StopIteration:
                break
            except bounds.LineTooLong:
                number += 1
                too_long = f"longer than {limits.batch_line_bytes:,} bytes"
                outbox.settle()  # the lines before it count in the message and exit code
                raise _stopped(summary, number, too_long) from None
            try:
                item = parse_batch_line(raw, limits)
                if item is None:
                    continue
                if reader_gone():  # nobody would read this outcome: do not run it
                    raise _output_lost(summary, "the reader of the output went away", outbox)
                chain.durable = not (agent.instant and outbox.may_wait() and more_waiting())
                served = _serve(chain, item, agent, pricing, limits)
            except BadInput as error:
                outbox.settle()
                raise _stopped(summary, number, str(error)) from None
            outbox.collect()  # lines before it whose writes ran ahead
            if served is not None:
                outbox.add(*served)
        outbox.settle()
    except BaseException as error:
        raise outbox.stopped(error) from None
    if summary.worst != ExitCode.OK:
        raise error_for(summary.worst, f"batch: {summary.text()}")
    return summary


class Outbox:
    """Outcome lines in input order, each written once its request is on disk."""

    def __init__(
        self,
        chain: RequestChain,
        emit: Callable[[dict[str, Any]], None],
        summary: BatchSummary,
        settler: Settler | None = None,
    ) -> None:
        self.chain, self.emit, self.summary = chain, emit, summary
        self.settler = settler
        self.waiting: list[dict[str, Any]] = []
        self.since = 0.0
        self.covered = 0  # the first waiting lines the settle in flight beside covers

    def may_wait(self) -> bool:
        """Whether one more line may join the burst without waiting for the disk. With a
        settler, a full burst first waits for the settle in flight beside it."""
        if not self.waiting:
            return True
        if self.settler is not None and self.settler.usable:
            if len(self.waiting) >= BURST_LINES and self.settler.running:
                self._settled_beside(self.settler.wait())
            return len(self.waiting) < BURST_LINES
        return len(self.waiting) < BURST_LINES and time.monotonic() - self.since < BURST_SECONDS

    def tend(self) -> None:
        """With a settler: write the lines of a settle beside that has finished, and start
        one for the lines waiting once there are a quarter of a burst of them, or they
        have waited half of its time (so a line waits about that long, at most a burst)."""
        settler = self.settler
        if settler is None:
            return
        if settler.running:
            done = settler.poll()
            if done is None:
                return
            self._settled_beside(done)
        ripe = len(self.waiting) >= BURST_LINES // 4 or (
            self.waiting and time.monotonic() - self.since >= BURST_SECONDS / 2
        )
        if not (ripe and settler.usable and self.chain.unsettled):
            return
        last = next((d["requestId"] for d in reversed(self.waiting) if d["requestId"]), None)
        if last is None:  # refusals only: nothing of theirs was written
            self._write_out()
        elif settler.start(self.chain.lease.session_id, last):
            self.covered = len(self.waiting)

    def _settled_beside(self, done: bool) -> None:
        """The settle beside has ended: its lines go out when it is on disk (when it failed,
        they wait for a settle on the chain's own connection)."""
        covered, self.covered = self.covered, 0
        if done:
            self._write_out(covered)

    def add(self, doc: dict[str, Any], state: str) -> None:
        self.summary.counts[state] += 1
        self.summary.worst = max(self.summary.worst, ExitCode(doc["exitCode"]))
        if not self.waiting:
            self.since = time.monotonic()
        self.waiting.append(doc)
        if not self.chain.unsettled:
            self._write_out()

    def pending(self) -> bool:
        """Whether a line is recorded but not yet written, or its write still runs."""
        return bool(self.waiting) or self.chain.in_flight()

    def collect(self) -> None:
        """Take the outcomes of the writes that ran ahead and finished, in order."""
        while self.chain.done:
            outcome = self.chain.done.pop(0)
            self.add(outcome.as_json(), outcome.state)

    def settle(self) -> None:
        """Finish the write that runs ahead, wait for the disk if a write did not, then
        write every waiting line."""
        self.chain.catch_up()
        self.collect()
        if self.settler is not None and self.settler.running:
            self._settled_beside(self.settler.wait())
        if self.waiting:
            self.chain.settle()
            self._write_out()

    def stopped(self, error: BaseException) -> BaseException:
        """The error a stopped batch raises: the burst before it settled and written,
        or, when that is not possible, the error saying what is unanswered."""
        if isinstance(error, WriteFailed):
            return error
        try:
            self.settle()
        except WriteFailed as failed:
            return failed
        except Exception:
            if not self.waiting:
                return error
            known = error if isinstance(error, TowerError) else classify(error)
            if known is None:
                return error
            unsure = len(self.waiting)
            lines = "one more line was" if unsure == 1 else f"{unsure} more lines were"
            return error_for(
                known.exit_code,
                f"{known.message}; {lines} recorded but not answered: the database went"
                " away before they were on disk (`towerctl session transcript` shows what"
                " was kept)",
            )
        return error

    def _write_out(self, lines: int | None = None) -> None:
        """Write the first `lines` waiting lines (all by default)."""
        count = len(self.waiting) if lines is None else min(lines, len(self.waiting))
        for _ in range(count):
            try:
                self.emit(self.waiting[0])
            except WriteFailed as failed:
                raise _output_lost(self.summary, failed.message, self) from None
            self.waiting.pop(0)
            self.covered = max(0, self.covered - 1)
            self.summary.answered += 1
        if self.waiting:
            self.since = time.monotonic()


def _serve(
    chain: RequestChain,
    item: BatchItem,
    agent: Agent,
    pricing: Pricing,
    limits: RequestLimits,
) -> tuple[dict[str, Any], str] | None:
    """The line's outcome and state; None while its write runs ahead."""
    session_id = chain.lease.session_id
    try:
        outcome = serve_request(
            chain.lease.conn,
            session_id,
            item.message,
            agent,
            idempotency_key=item.idempotency_key,
            pricing=pricing,
            limits=limits,
            chain=chain,
        )
    except NotServed as refused:  # not recorded: paused, expired, busy
        return unrecorded_refusal(session_id, str(refused)), "rejected"
    return None if outcome is None else (outcome.as_json(), outcome.state)


def _stopped(summary: BatchSummary, number: int, problem: str) -> Exception:
    return error_for(
        max(summary.worst, ExitCode.BAD_INPUT),
        f"line {number}: {problem} (stopped; before it: {summary.text()})",
    )


def _output_lost(summary: BatchSummary, reason: str, outbox: Outbox) -> WriteFailed:
    chain = outbox.chain  # written or not, a line whose write ran ahead is recorded
    unwritten = len(outbox.waiting) + len(chain.done) + int(chain.in_flight())
    recorded = (
        "; one more was recorded but its outcome not written"
        if unwritten == 1
        else f"; {unwritten} more were recorded but their outcomes not written"
        if unwritten
        else ""
    )
    return WriteFailed(
        f"batch stopped, {reason}: {summary.answered} line"
        f"{'s' if summary.answered != 1 else ''} answered{recorded}; no further line was run"
    )
