"""A batch of session requests: NDJSON in, one outcome line per request out, in order.

Each line is one request (`session_requests.run_request`), the same path as a single
request's, under the session's lease kept from one line to the next (`KeptLease`: a
line costs one round trip, not two). A write does not keep the lease when another
client waits for the session (that client has asked for the lease, `lease`), so other
clients' requests interleave with a long batch rather than wait for all of it. The
batch gives a kept lease back when it ends, however it ends; a killed batch's runs out.

A line's outcome is written and flushed before the next line runs, and the next line
runs only while someone reads the outcomes (SPEC 11): when the reader has gone, at most
the line whose agent was already called is recorded unread.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl import bounds
from towerctl.agents import Agent
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, ExitCode, NotServed, WriteFailed, error_for
from towerctl.requests.lease import SessionLease, hold_seconds
from towerctl.requests.record import KeptLease
from towerctl.requests.serve import run_request, unrecorded_refusal

if TYPE_CHECKING:
    import psycopg

BATCH_KEYS = frozenset({"message", "idempotencyKey"})


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

    def add(self, doc: dict[str, Any], state: str) -> None:
        self.counts[state] += 1
        self.worst = max(self.worst, ExitCode(doc["exitCode"]))

    def text(self) -> str:
        return ", ".join(f"{n} {state}" for state, n in self.counts.items())


def run_batch(
    conn: psycopg.Connection,
    session_id: UUID,
    lines: Iterable[bytes],
    agent: Agent,
    emit: Callable[[dict[str, Any]], None],
    *,
    reader_gone: Callable[[], bool] = lambda: False,
    pricing: Pricing | None = None,
    limits: RequestLimits | None = None,
) -> BatchSummary:
    """Serve NDJSON requests in order, handing each outcome to `emit` (one line each,
    written before the next line runs).

    Returns when every line completed; otherwise raises the error that carries the
    largest exit code among the lines. A malformed line stops the batch after the
    lines before it (exit 2). When the reader of the outcomes is gone (`reader_gone`
    before a line's agent is called, or `emit` raising WriteFailed), the requests
    recorded stay recorded, no further line runs, and WriteFailed (exit 10) says how
    many lines were answered. `lines` raising `bounds.LineTooLong` is a line past the
    batch line bound (exit 2).
    """
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    kept = KeptLease(
        SessionLease(
            conn,
            session_id,
            hold_seconds=hold_seconds(agent.name, limits.agent_timeout_seconds),
            wait_seconds=limits.busy_wait_seconds,
        )
    )
    summary = BatchSummary()
    with kept.lease:
        numbered = enumerate(lines, start=1)
        number = 0
        while True:
            try:
                number, raw = next(numbered)
            except StopIteration:
                break
            except bounds.LineTooLong:
                number += 1
                too_long = f"longer than {limits.batch_line_bytes:,} bytes"
                raise _stopped(summary, number, too_long, emit) from None
            try:
                item = parse_batch_line(raw, limits)
                if item is None:
                    continue
                if reader_gone():  # nobody would read this outcome: do not run it
                    raise _output_lost(summary, "the reader of the output went away")
                doc, state = _serve(kept, item, agent, pricing, limits)
            except BadInput as error:
                raise _stopped(summary, number, str(error), emit) from None
            summary.add(doc, state)
            try:
                emit(doc)
            except WriteFailed as failed:
                raise _output_lost(summary, failed.message, unread=doc) from None
            summary.answered += 1
    if summary.worst != ExitCode.OK:
        raise error_for(summary.worst, f"batch: {summary.text()}")
    return summary


def _serve(
    kept: KeptLease,
    item: BatchItem,
    agent: Agent,
    pricing: Pricing,
    limits: RequestLimits,
) -> tuple[dict[str, Any], str]:
    """The line's outcome document and state."""
    session_id = kept.lease.session_id
    try:
        outcome = run_request(
            kept.lease.conn,
            session_id,
            item.message,
            agent,
            idempotency_key=item.idempotency_key,
            pricing=pricing,
            limits=limits,
            kept=kept,
        )
    except NotServed as refused:  # not recorded: paused, expired, busy
        return unrecorded_refusal(session_id, str(refused)), "rejected"
    return outcome.as_json(), outcome.state


def _stopped(
    summary: BatchSummary, number: int, problem: str, emit: Callable[[dict[str, Any]], None]
) -> Exception:
    """The error that stops a batch at a bad line; its NDJSON line goes out first, so a
    script reading the outcomes sees one compact line for every line it sent."""
    code = max(summary.worst, ExitCode.BAD_INPUT)
    message = f"line {number}: {problem} (stopped; before it: {summary.text()})"
    with contextlib.suppress(WriteFailed):  # a reader gone: the exit code still tells
        emit({"error": {"message": message, "exitCode": int(ExitCode.BAD_INPUT), "line": number}})
    return error_for(code, message)


def _output_lost(
    summary: BatchSummary, reason: str, unread: dict[str, Any] | None = None
) -> WriteFailed:
    """The error of a batch whose outcomes can no longer be written; `unread`: the
    outcome that could not be, recorded when it has a request id."""
    recorded = (
        "; one more was recorded but its outcome not written"
        if unread is not None and unread["requestId"] is not None
        else ""
    )
    return WriteFailed(
        f"batch stopped, {reason}: {summary.answered} line"
        f"{'s' if summary.answered != 1 else ''} answered{recorded}; no further line was run"
    )
