"""One session request: validate, take the session's lease, build the context, call
the agent, then write the request row, the debit, the balance and both messages,
and give the lease back, in ONE transaction (one function call).

Money rules (SPEC 6, formulas in `request_rules`):
- a request whose minimum cost (no output) exceeds the balance is `rejected`,
  debits nothing and pauses the session;
- completed work is charged up to the balance, never below zero; a session left
  with less than `eval fee + 1` sat is paused; rejected and failed debit nothing.

At most one request per session is in flight: the session row's lease (`lease`)
is taken, in the same call as the reads the request needs (0012's
`towerctl_take_request`), and released by the call that writes the outcome
(`towerctl_write_request`), which writes nothing when the lease was lost. In a
batch (`KeptLease`) that write may instead keep the lease and read the next
request's history: a batch line then costs one round trip. Both are plpgsql
functions, so the server keeps their plans per connection without prepared
statements (pooler-safe). No transaction is open while the agent runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.agents import Agent, AgentReply, ChatMessage
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, NotServed
from towerctl.requests.lease import SessionLease, hold_seconds
from towerctl.requests.record import History, KeptLease, RequestOutcome, history, record, refusal
from towerctl.requests.rules import (
    bounded_reply,
    context_window,
    cost_sats,
    message_digest,
    plausible,
    tokens,
    validate_idempotency_key,
    validate_message,
)

if TYPE_CHECKING:
    import psycopg

# The take and the reads under the lease in one call (migration 0012: a plpgsql function,
# whose plans the server keeps per connection, so nothing is planned per request):
# (outcome, seconds the holder still has, state, balance, the last messages newest first
# as three arrays, then the first outcome of the idempotency key if it was used).
TAKE = """
SELECT * FROM towerctl_take_request(%(sid)s::uuid, %(me)s::uuid, %(hold)s::float8,
    %(key)s::text, %(context)s::integer, %(want)s::float8)"""


def unrecorded_refusal(session_id: UUID, reason: str) -> dict[str, Any]:
    """The outcome document of a request refused without being recorded (paused, expired,
    awaiting payment, busy, lease lost): no request id, state `rejected`, exit code 5."""
    return refusal(session_id, reason).as_json()


def _replay(session_id: UUID, message: str, key: str, row: Sequence[Any]) -> RequestOutcome | None:
    """The first outcome of an idempotency key, from TAKE's replay columns (None: unused)."""
    if row[0] is None:
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


def run_request(
    conn: psycopg.Connection,
    session_id: UUID,
    message: str,
    agent: Agent,
    *,
    idempotency_key: str | None = None,
    pricing: Pricing | None = None,
    limits: RequestLimits | None = None,
    kept: KeptLease | None = None,
) -> RequestOutcome:
    """Serve one request on a session (the caller has authorised it); `kept`: a batch's
    lease, which the write keeps for the next request (the batch gives it back)."""
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    validate_message(message, limits)
    key = validate_idempotency_key(idempotency_key)
    lease: SessionLease[None] = (
        kept.lease
        if kept is not None
        else SessionLease(
            conn,
            session_id,
            hold_seconds=hold_seconds(agent.name, limits.agent_timeout_seconds),
            wait_seconds=limits.busy_wait_seconds,
        )
    )
    start = kept.take_start() if kept is not None else None
    try:
        # A key is looked up under the lease: such a request always asks the server.
        if start is not None and key is None:
            state, balance, recent = start
        else:
            params = lease.params | {"key": key, "context": limits.context_messages}
            row = lease.take_by(TAKE, params)
            _outcome, _left, state, balance, roles, contents, counts, *replayed = row
            earlier = _replay(session_id, message, key, replayed) if key else None
            if earlier is not None:
                return earlier
            recent = history(roles, contents, counts)
        if state in ("expired", "awaiting_payment"):
            raise NotServed(f"session {session_id} is {state.replace('_', ' ')}")
        if state == "paused":
            raise NotServed(f"session {session_id} is paused", hint="top it up to resume")
        return _serve(conn, lease, message, agent, key, recent, balance, pricing, limits, kept)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            lease.release()  # the lease runs out on its own if this fails
        raise


def _serve(
    conn: psycopg.Connection,
    lease: SessionLease[None],
    message: str,
    agent: Agent,
    key: str | None,
    recent: History,
    balance: int,
    pricing: Pricing,
    limits: RequestLimits,
    kept: KeptLease | None,
) -> RequestOutcome:
    """The context, the minimum-cost check, the agent and the write, under the lease."""
    context = context_window(recent, limits)
    conversation = [*context, ChatMessage("user", message)]
    input_tokens = sum(tokens(m.content) for m in conversation)
    minimum = cost_sats(pricing, input_tokens, 0)
    common: dict[str, Any] = {
        "agent": agent.name,
        "key": key,
        "pricing": pricing,
        "context": limits.context_messages,
        "kept": kept,
    }
    if minimum > balance:
        reason = (
            f"insufficient balance: this request costs at least {minimum} sats "
            f"and the session holds {balance}"
        )
        return record(
            conn,
            lease,
            message,
            AgentReply("rejected", reason),
            input_tokens=input_tokens,
            output_tokens=0,
            cost=0,
            pause=True,
            **common,
        )
    reply = bounded_reply(agent.answer(str(lease.session_id), conversation), limits)
    estimate = tokens(reply.text) if reply.state == "complete" else 0
    input_tokens = plausible(reply.input_tokens, input_tokens)
    output_tokens = plausible(reply.output_tokens, estimate)
    return record(
        conn,
        lease,
        message,
        reply,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost=cost_sats(pricing, input_tokens, output_tokens),
        pause=False,
        **common,
    )
