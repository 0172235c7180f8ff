"""One session request: validate, take the session's lease, build the context, call
the agent, then write the request row, the debit, the balance and both messages,
and give the lease back, in ONE transaction (one function call).

Money rules (SPEC 6, formulas in `request_rules`):
- a request whose minimum cost (no output) exceeds the balance is `rejected`,
  debits nothing and pauses the session;
- the agent is told the most output tokens the balance buys after the minimum cost
  (`output_budget`) and its reply is cut there: completed work is charged its whole
  cost, which never exceeds the balance; a budget of zero tokens is refused as above;
  a session left with less than `eval fee + 1` sat is paused; rejected, failed and
  empty replies debit nothing.

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

from towerctl.agents import Agent, AgentReply, ChatMessage, TextSink
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, NotServed
from towerctl.requests.lease import SessionLease, hold_seconds
from towerctl.requests.record import History, KeptLease, RequestOutcome, history, record, refusal
from towerctl.requests.rules import (
    bounded_reply,
    context_window,
    cost_sats,
    cut_to_budget,
    message_digest,
    output_budget,
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
    on_text: TextSink | None = None,
) -> RequestOutcome:
    """Serve one request on a session (the caller has authorised it); `kept`: a batch's
    lease, which the write keeps for the next request (the batch gives it back);
    `on_text`: shown the reply as it arrives (within the budget), before the write."""
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    validate_message(message, limits)
    key = validate_idempotency_key(idempotency_key)
    lease: SessionLease = (
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
        return _serve(
            conn, lease, message, agent, key, recent, balance, pricing, limits, kept, on_text
        )
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            lease.release()  # the lease runs out on its own if this fails
        raise


def _serve(
    conn: psycopg.Connection,
    lease: SessionLease,
    message: str,
    agent: Agent,
    key: str | None,
    recent: History,
    balance: int,
    pricing: Pricing,
    limits: RequestLimits,
    kept: KeptLease | None,
    on_text: TextSink | None = None,
) -> RequestOutcome:
    """The context, the minimum-cost check, the agent and the write, under the lease.

    The agent is told its budget (what the balance buys after the minimum cost) and its
    reply is cut there, so a completed request's cost never exceeds the balance."""
    context = context_window(recent, limits)
    conversation = [*context, ChatMessage("user", message)]
    input_tokens = sum(tokens(m.content) for m in conversation)
    minimum = cost_sats(pricing, input_tokens, 0)
    budget = output_budget(pricing, balance, input_tokens, _most_tokens(limits))
    common: dict[str, Any] = {
        "agent": agent.name,
        "key": key,
        "pricing": pricing,
        "context": limits.context_messages,
        "kept": kept,
    }
    if minimum > balance or budget == 0:
        reason = (
            f"insufficient balance: this request costs at least {minimum} sats "
            f"and the session holds {balance}"
            + ("" if minimum > balance else ", which buys no output")
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
    sink = None if on_text is None else _within(on_text, budget * 4)
    reply = agent.answer(str(lease.session_id), conversation, budget, sink)
    reply = bounded_reply(reply, limits)  # past the reply bound: failed, before any cut
    if reply.state == "complete" and not reply.text.strip():
        reply = AgentReply("failed", "agent's reply is empty")  # no answer: nothing charged
    elif reply.state == "complete":
        text, cut = cut_to_budget(reply.text, budget)
        reply = AgentReply(
            "complete", text, reply.input_tokens, reply.output_tokens, reply.truncated or cut
        )
    input_tokens, output_tokens = _charged_tokens(pricing, balance, input_tokens, budget, reply)
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


def _most_tokens(limits: RequestLimits) -> int:
    """No budget is larger than the longest reply that can be stored."""
    return tokens("x" * limits.max_reply_chars)


def _within(on_text: TextSink, most_chars: int) -> TextSink:
    """`on_text`, shown no more than the first `most_chars` characters (the budget)."""
    shown = 0

    def show(piece: str) -> None:
        nonlocal shown
        piece = piece[: max(0, most_chars - shown)]
        if piece:
            shown += len(piece)
            on_text(piece)

    return show


def _charged_tokens(
    pricing: Pricing, balance: int, counted_in: int, budget: int, reply: AgentReply
) -> tuple[int, int]:
    """(input, output) tokens a reply is charged for: the agent's reported usage when it
    is plausible, never beyond what the balance buys (a reported input that leaves no
    room is replaced by the count the budget was made from; the output by the budget
    for that input), so cost <= balance and the debit is the whole cost."""
    if reply.state != "complete":
        return plausible(reply.input_tokens, counted_in), 0
    input_tokens = plausible(reply.input_tokens, counted_in)
    if cost_sats(pricing, input_tokens, 0) > balance:
        input_tokens = counted_in
    room = output_budget(pricing, balance, input_tokens, budget)
    return input_tokens, min(plausible(reply.output_tokens, tokens(reply.text)), room)
