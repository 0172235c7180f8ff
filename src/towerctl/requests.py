"""Session requests: validate, build the context, call the agent, then write the
request row, the debit, the balance and both messages in ONE statement.

Money rules (SPEC 6):
- cost = eval fee + ceil((input + output tokens) x sats per 1k / 1000 x margin);
- a request whose minimum cost (no output) exceeds the balance is `rejected`,
  debits nothing and pauses the session;
- completed work is charged up to the balance, never below zero; a session left
  with less than `eval fee + 1` sat is paused; rejected and failed debit nothing.

At most one request per session is in flight: a per-session advisory lock is
held (on the connection, outside any transaction) from before the context is
read until the outcome is written; a second request waits up to the busy wait
and is then refused as busy with nothing written. No transaction is open while
the agent runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, Decimal
from typing import IO, TYPE_CHECKING, Any
from uuid import UUID

from towerctl import bounds
from towerctl.agents import Agent, AgentReply, ChatMessage, clean
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, ExitCode, NotFound, NotServed, WriteFailed, error_for
from towerctl.sessions import IDLE_LIFETIME

if TYPE_CHECKING:
    import psycopg

# First key of the two-key advisory lock; the second is the session's hash.
LOCK_NAMESPACE = 0x746F77
MAX_IDEMPOTENCY_KEY = int(bounds.IDEMPOTENCY_KEY_CHARS.default)
MAX_REPORTED_TOKENS = int(bounds.REPORTED_TOKENS.default)
BATCH_KEYS = frozenset({"message", "idempotencyKey"})

TRY_LOCK_SESSION = "SELECT pg_try_advisory_lock(%s, hashtext(%s::text))"
LOCK_SESSION = "SELECT pg_advisory_lock(%s, hashtext(%s::text))"
UNLOCK_SESSION = "SELECT pg_advisory_unlock(%s, hashtext(%s::text))"
# The session's state and balance, applying a due expiry on the way (one round trip).
READ_SESSION = """
WITH expired AS (
    UPDATE sessions SET state = 'expired'
    WHERE id = %(sid)s AND state <> 'expired' AND expires_at <= now()
    RETURNING state, balance_sats
)
SELECT state, balance_sats FROM expired
UNION ALL
SELECT state, balance_sats FROM sessions
WHERE id = %(sid)s AND NOT EXISTS (SELECT 1 FROM expired)"""
READ_HISTORY = """
SELECT role, content, token_count FROM session_messages
WHERE session_id = %s ORDER BY id DESC LIMIT %s"""
FIND_BY_KEY = """
SELECT r.id, r.state, r.reason, r.error_message, r.debited_sats, r.balance_after_sats,
       r.input_tokens, r.output_tokens, r.message_sha256,
       (SELECT m.content FROM session_messages m
        WHERE m.session_id = r.session_id AND m.session_request_id = r.id
          AND m.role = 'assistant' LIMIT 1)
FROM session_requests r WHERE r.session_id = %s AND r.idempotency_key = %s"""
RECORD = f"""
WITH s AS (
    SELECT id, balance_sats FROM sessions WHERE id = %(sid)s FOR UPDATE
), req AS (
    INSERT INTO session_requests (
        session_id, state, agent, reason, error_message, input_tokens, output_tokens,
        cost_sats, debited_sats, balance_after_sats, idempotency_key, message_sha256,
        completed_at)
    SELECT s.id, %(state)s::text, %(agent)s, %(reason)s, %(error)s, %(in)s, %(out)s,
           %(cost)s::bigint,
           CASE WHEN %(state)s::text = 'complete' THEN least(%(cost)s::bigint, s.balance_sats)
                ELSE 0 END,
           s.balance_sats
             - CASE WHEN %(state)s::text = 'complete' THEN least(%(cost)s::bigint, s.balance_sats)
                    ELSE 0 END,
           %(key)s, %(digest)s, now()
    FROM s
    RETURNING session_id, id, debited_sats, balance_after_sats
), balance AS (
    UPDATE sessions
    SET balance_sats = req.balance_after_sats,
        state = CASE WHEN sessions.state = 'expired' OR sessions.expires_at <= now()
                          THEN 'expired'
                     WHEN %(pause)s OR req.balance_after_sats < %(floor)s THEN 'paused'
                     ELSE sessions.state END,
        last_activity_at = now(),
        expires_at = CASE WHEN sessions.state = 'expired' OR sessions.expires_at <= now()
                          THEN sessions.expires_at
                          ELSE now() + interval '{IDLE_LIFETIME}' END
    FROM req WHERE sessions.id = req.session_id
    RETURNING sessions.state
), debit AS (
    INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)
    SELECT session_id, 'debit', debited_sats, id FROM req WHERE debited_sats > 0
), messages AS (
    INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
    SELECT req.session_id, m.role, m.content, req.id, m.tokens
    FROM req, (VALUES (1, 'user', %(user)s::text, %(user_tokens)s::int),
                      (2, 'assistant', %(reply)s::text, %(reply_tokens)s::int))
              AS m(ord, role, content, tokens)
    WHERE m.content <> ''
    ORDER BY m.ord
)
SELECT req.id, req.debited_sats, req.balance_after_sats, balance.state FROM req, balance"""


@dataclass(frozen=True)
class RequestOutcome:
    request_id: int | None
    session_id: UUID
    state: str  # complete | rejected | failed
    result: str | None
    reason: str | None
    error_message: str | None
    debited_sats: int
    balance_remaining: int | None
    input_tokens: int
    output_tokens: int
    replayed: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "requestId": self.request_id,
            "sessionId": str(self.session_id),
            "state": self.state,
            "result": self.result,
            "reason": self.reason,
            "errorMessage": self.error_message,
            "debitedSats": self.debited_sats,
            "balanceRemaining": self.balance_remaining,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
        }


def unrecorded_refusal(session_id: UUID, reason: str) -> dict[str, Any]:
    """The outcome line for a request refused without being recorded (paused, busy…)."""
    return RequestOutcome(
        request_id=None,
        session_id=session_id,
        state="rejected",
        result=None,
        reason=reason,
        error_message=None,
        debited_sats=0,
        balance_remaining=None,
        input_tokens=0,
        output_tokens=0,
    ).as_json()


def tokens(text: str) -> int:
    """The token estimate of SPEC 6: ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


def cost_sats(pricing: Pricing, input_tokens: int, output_tokens: int) -> int:
    """eval fee + ceil((input + output) x sats per 1k / 1000 x margin), in exact decimals."""
    variable = (
        Decimal(input_tokens + output_tokens)
        * Decimal(str(pricing.sats_per_1k_tokens))
        / Decimal(1000)
        * Decimal(str(pricing.margin))
    )
    return pricing.eval_fee_sats + int(variable.to_integral_value(rounding=ROUND_CEILING))


def context_window(
    newest_first: Sequence[tuple[str, str, int]], limits: RequestLimits
) -> list[ChatMessage]:
    """The last N messages within the token budget, oldest dropped first; oldest first out."""
    chosen = list(newest_first[: limits.context_messages])
    chosen.reverse()
    total = sum(t for _, _, t in chosen)
    while chosen and total > limits.context_tokens:
        total -= chosen.pop(0)[2]
    return [ChatMessage(role, content) for role, content, _ in chosen]


def _plausible(reported: int | None, estimate: int) -> int:
    """An agent's reported token count, unless it is missing or implausible (negative,
    beyond any context window, or zero for a non-empty text): then our own estimate."""
    if reported is None or not 0 <= reported <= MAX_REPORTED_TOKENS:
        return estimate
    if reported == 0 and estimate > 0:
        return estimate
    return reported


def bounded_reply(reply: AgentReply, limits: RequestLimits) -> AgentReply:
    """The agent's reply as stored: cleaned, and `failed` when a result or reason is
    longer than the reply bound (a failed request charges nothing); an error message
    is cut to its own bound."""
    if reply.state == "failed":
        reply = replace(reply, text=reply.text[: bounds.ERROR_MESSAGE_CHARS])
    elif len(reply.text) > limits.max_reply_chars:
        return AgentReply(
            "failed",
            f"agent's reply has {len(reply.text):,} characters; the maximum is "
            f"{limits.max_reply_chars:,} (TOWER_MAX_REPLY_CHARS)",
        )
    return replace(reply, text=clean(reply.text))


def read_message(stream: IO[bytes], limits: RequestLimits) -> str:
    """The message on a binary stream (stdin), read up to its byte bound and no further;
    one trailing newline is dropped. Past the bound: BadInput, nothing read beyond it."""
    cap = limits.message_stdin_bytes
    raw = bounds.read_at_most(stream, cap)
    if len(raw) > cap:
        raise BadInput(
            f"the message on stdin is longer than {cap:,} bytes; the maximum is "
            f"{limits.max_message_chars:,} characters (TOWER_MAX_MESSAGE_CHARS)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("the message on stdin is not valid UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def validate_message(message: str, limits: RequestLimits) -> str:
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("the message is not valid UTF-8") from None
    if "\x00" in message:
        raise BadInput("the message contains a NUL character")
    if not message.strip():
        raise BadInput("the message is empty")
    if len(message) > limits.max_message_chars:
        raise BadInput(
            f"the message has {len(message):,} characters; the maximum is "
            f"{limits.max_message_chars:,} (TOWER_MAX_MESSAGE_CHARS)"
        )
    return message


def validate_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or "\x00" in key:
        raise BadInput(f"idempotency keys are 1 to {MAX_IDEMPOTENCY_KEY} characters without NUL")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("the idempotency key is not valid UTF-8") from None
    return key


def message_digest(message: str) -> str:
    return hashlib.sha256(message.encode("utf-8")).hexdigest()


def _replay(
    session_id: UUID, message: str, key: str, row: tuple[Any, ...] | None
) -> RequestOutcome | None:
    """The first outcome of an idempotency key, from its FIND_BY_KEY row."""
    if row is None:
        return None
    rid, state, reason, error, debited, balance_after, tin, tout, digest, reply = row
    if digest is not None and digest != message_digest(message):
        raise BadInput(
            f"idempotency key {key!r} was already used for a different message",
            hint="use a new key for a new request",
        )
    return RequestOutcome(
        request_id=rid,
        session_id=session_id,
        state=state,
        result=reply if state == "complete" else None,
        reason=reason,
        error_message=error,
        debited_sats=debited,
        balance_remaining=balance_after,
        input_tokens=tin,
        output_tokens=tout,
        replayed=True,
    )


class SessionLock:
    """The per-session advisory lock that keeps one request per session in flight."""

    def __init__(self, conn: psycopg.Connection, session_id: UUID, wait_seconds: float) -> None:
        self.conn, self.session_id, self.wait_seconds = conn, session_id, wait_seconds

    def __enter__(self) -> SessionLock:
        import psycopg

        key = (LOCK_NAMESPACE, str(self.session_id))
        row = self.conn.execute(TRY_LOCK_SESSION, key).fetchone()
        if row and row[0]:
            return self  # the usual case: nobody else is in flight, one round trip
        self.conn.execute(f"SET lock_timeout = '{max(int(self.wait_seconds * 1000), 1)}ms'")
        try:
            self.conn.execute(LOCK_SESSION, key)
        except psycopg.errors.LockNotAvailable:
            raise NotServed(
                f"session {self.session_id} is busy with another request",
                hint=f"waited {self.wait_seconds:g}s (TOWER_BUSY_WAIT); retry later",
            ) from None
        finally:
            self.conn.execute("SET lock_timeout = DEFAULT")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.conn.closed and not self.conn.broken:
            self.conn.execute(UNLOCK_SESSION, (LOCK_NAMESPACE, str(self.session_id)))


def _record(
    conn: psycopg.Connection,
    session_id: UUID,
    message: str,
    reply: AgentReply,
    *,
    agent: str,
    key: str | None,
    input_tokens: int,
    output_tokens: int,
    cost: int,
    pause: bool,
    pricing: Pricing,
) -> RequestOutcome:
    reason = reply.text if reply.state == "rejected" else None
    error = reply.text if reply.state == "failed" else None
    params = {
        "sid": session_id,
        "state": reply.state,
        "agent": agent,
        "reason": reason,
        "error": error,
        "in": input_tokens,
        "out": output_tokens,
        "cost": cost if reply.state == "complete" else 0,
        "key": key,
        "digest": message_digest(message),
        "pause": pause,
        "floor": pricing.eval_fee_sats + 1,
        "user": message,
        "user_tokens": tokens(message),
        "reply": reply.text,
        "reply_tokens": tokens(reply.text),
    }
    row = conn.execute(RECORD, params).fetchone()
    if row is None:  # the session vanished between the checks and the write
        raise NotServed(f"session {session_id} is gone")
    rid, debited, balance_after, _state = row
    return RequestOutcome(
        request_id=rid,
        session_id=session_id,
        state=reply.state,
        result=reply.text if reply.state == "complete" else None,
        reason=reason,
        error_message=error,
        debited_sats=debited,
        balance_remaining=balance_after,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )


def run_request(
    conn: psycopg.Connection,
    session_id: UUID,
    message: str,
    agent: Agent,
    *,
    idempotency_key: str | None = None,
    pricing: Pricing | None = None,
    limits: RequestLimits | None = None,
) -> RequestOutcome:
    """Serve one request on a session (the caller has authorised it)."""
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    validate_message(message, limits)
    key = validate_idempotency_key(idempotency_key)
    with SessionLock(conn, session_id, limits.busy_wait_seconds):
        with conn.pipeline():  # the replay check, the session and its history: one round trip
            replay = conn.execute(FIND_BY_KEY, (session_id, key)) if key else None
            current = conn.execute(READ_SESSION, {"sid": session_id})
            recent = conn.execute(READ_HISTORY, (session_id, limits.context_messages))
        earlier = _replay(session_id, message, key, replay.fetchone()) if key and replay else None
        if earlier is not None:
            return earlier
        row = current.fetchone()
        if row is None:
            raise NotFound(f"no session {session_id}")
        state, balance = row
        if state in ("expired", "awaiting_payment"):
            raise NotServed(f"session {session_id} is {state.replace('_', ' ')}")
        if state == "paused":
            raise NotServed(f"session {session_id} is paused", hint="top it up to resume")
        history = recent.fetchall()
        context = context_window(history, limits)
        conversation = [*context, ChatMessage("user", message)]
        input_tokens = sum(tokens(m.content) for m in conversation)
        minimum = cost_sats(pricing, input_tokens, 0)
        if minimum > balance:
            reason = (
                f"insufficient balance: this request costs at least {minimum} sats "
                f"and the session holds {balance}"
            )
            return _record(
                conn,
                session_id,
                message,
                AgentReply("rejected", reason),
                input_tokens=input_tokens,
                output_tokens=0,
                cost=0,
                pause=True,
                agent=agent.name,
                key=key,
                pricing=pricing,
            )
        reply = bounded_reply(agent.answer(str(session_id), conversation), limits)
        estimate = tokens(reply.text) if reply.state == "complete" else 0
        input_tokens = _plausible(reply.input_tokens, input_tokens)
        output_tokens = _plausible(reply.output_tokens, estimate)
        cost = cost_sats(pricing, input_tokens, output_tokens)
        return _record(
            conn,
            session_id,
            message,
            reply,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost=cost,
            pause=False,
            agent=agent.name,
            key=key,
            pricing=pricing,
        )


# --- batches -------------------------------------------------------------------------------


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


STATE_CODES = {"complete": ExitCode.OK, "rejected": ExitCode.NOT_SERVED}


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
    """Serve NDJSON requests in order, handing each outcome to `emit` (one line each).

    Returns when every line completed; otherwise raises the error that carries the
    largest exit code among the lines. A malformed line stops the batch after the
    lines before it (exit 2). When the reader of the outcomes is gone (`reader_gone`
    before a line, or `emit` raising WriteFailed), the request in flight stays recorded,
    no further line runs, and WriteFailed (exit 10) says how many lines were answered.
    `lines` raising `bounds.LineTooLong` is a line past the batch line bound (exit 2).
    """
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    summary = BatchSummary()
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
            raise _stopped(summary, number, too_long) from None
        try:
            item = parse_batch_line(raw, limits)
            if item is None:
                continue
            if reader_gone():  # nobody would read this outcome: do not run it
                raise _output_lost(summary, "the reader of the output went away", in_flight=False)
            doc, state = _serve(conn, session_id, item, agent, pricing, limits)
        except BadInput as error:
            raise _stopped(summary, number, str(error)) from None
        summary.counts[state] += 1
        summary.worst = max(summary.worst, STATE_CODES.get(state, ExitCode.AGENT_FAILED))
        try:
            emit(doc)
        except WriteFailed as failed:
            raise _output_lost(summary, failed.message, in_flight=True) from None
        summary.answered += 1
    if summary.worst != ExitCode.OK:
        raise error_for(summary.worst, f"batch: {summary.text()}")
    return summary


def _serve(
    conn: psycopg.Connection,
    session_id: UUID,
    item: BatchItem,
    agent: Agent,
    pricing: Pricing,
    limits: RequestLimits,
) -> tuple[dict[str, Any], str]:
    try:
        outcome = run_request(
            conn,
            session_id,
            item.message,
            agent,
            idempotency_key=item.idempotency_key,
            pricing=pricing,
            limits=limits,
        )
    except NotServed as refused:  # not recorded: paused, expired, busy
        return unrecorded_refusal(session_id, str(refused)), "rejected"
    return outcome.as_json(), outcome.state


def _stopped(summary: BatchSummary, number: int, problem: str) -> Exception:
    return error_for(
        max(summary.worst, ExitCode.BAD_INPUT),
        f"line {number}: {problem} (stopped; before it: {summary.text()})",
    )


def _output_lost(summary: BatchSummary, reason: str, *, in_flight: bool) -> WriteFailed:
    recorded = "; one more was recorded but its outcome not written" if in_flight else ""
    return WriteFailed(
        f"batch stopped, {reason}: {summary.answered} line"
        f"{'s' if summary.answered != 1 else ''} answered{recorded}; no further line was run"
    )
