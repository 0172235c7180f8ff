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
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.agents import Agent, AgentReply, ChatMessage, clean
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, NotFound, NotServed
from towerctl.sessions import IDLE_LIFETIME

if TYPE_CHECKING:
    import psycopg

# First key of the two-key advisory lock; the second is the session's hash.
LOCK_NAMESPACE = 0x746F77
MAX_IDEMPOTENCY_KEY = 200
MAX_REPORTED_TOKENS = 10_000_000  # more than any model's window: a report beyond it is bogus

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
        reply = agent.answer(str(session_id), conversation)
        reply = replace(reply, text=clean(reply.text))
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
