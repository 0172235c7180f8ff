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
batch (`RequestChain`) that write may instead keep the lease and read the next
request's history: a batch line then costs one round trip. Both are plpgsql
functions, so the server keeps their plans per connection without prepared
statements (pooler-safe). No transaction is open while the agent runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.agents import Agent, AgentReply, ChatMessage
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput, ExitCode, NotServed
from towerctl.lease import MARGIN_SECONDS, LeaseLost, SessionLease, hold_seconds
from towerctl.request_rules import (
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
# The outcome's write (migration 0012, after 0011's): the request row, the debit, the
# balance and both messages, only while this request holds the lease (no row otherwise);
# the lease given back, or, in a batch (renew), kept for the next request with the
# state and history it needs: (id, debited, balance after, state, kept, three arrays).
# Its commit waits for the disk unless `commit` is 'off' (a batch's burst, below): that
# setting is LOCAL to the request's own transaction, so nothing outlives it, behind a
# transaction-pooling PgBouncer too.
RECORD = """
SELECT w.*, set_config('synchronous_commit',
                       coalesce(%(commit)s::text, current_setting('synchronous_commit')), true)
FROM towerctl_write_request(
    %(sid)s::uuid, %(me)s::uuid, %(state)s::text, %(agent)s::text, %(reason)s::text,
    %(error)s::text, %(in)s::integer, %(out)s::integer, %(cost)s::bigint, %(key)s::text,
    %(digest)s::text, %(pause)s::boolean, %(floor)s::bigint, %(user)s::text,
    %(user_tokens)s::integer, %(reply)s::text, %(reply_tokens)s::integer,
    %(renew)s::float8, %(context)s::integer) AS w"""
# A commit that waits for the disk waits for every commit before it: a transaction with
# an id of its own (and nothing else) settles a burst of writes that did not wait.
SETTLE = "SELECT pg_current_xact_id()"

History = list[tuple[str, str, int]]  # (role, content, tokens), newest first


def _history(roles: list[str] | None, contents: list[str], counts: list[int]) -> History:
    return list(zip(roles, contents, counts, strict=True)) if roles else []


class RequestChain:
    """The requests of one batch on one session: one lease owner throughout, and a write
    may keep the lease for the next request together with what it needs (state,
    balance, history), so that request starts without a round trip. A kept lease is
    given back when the chain ends (`with chain.lease:`), or runs out on its own."""

    def __init__(self, lease: SessionLease[None]) -> None:
        self.lease = lease
        self.next_start: tuple[str, int, History] | None = None
        # whether the next write waits for the disk, and whether one that did not is
        # not yet known to be on disk (the batch decides, `batch.Outbox`)
        self.durable = True
        self.unsettled = False

    def settle(self) -> None:
        """Return once every write of the chain is on disk."""
        if self.unsettled:
            self.lease.conn.execute(SETTLE)
            self.unsettled = False

    def kept_start(self) -> tuple[str, int, History] | None:
        """What the previous write read for this request, while its lease is surely ours."""
        start, self.next_start = self.next_start, None
        return start if start is not None and self.lease.still_kept() else None


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
            "replayed": self.replayed,
            "exitCode": int(self.exit_code),
        }

    @property
    def exit_code(self) -> ExitCode:
        return OUTCOME_CODES[self.state]


OUTCOME_CODES = {
    "complete": ExitCode.OK,
    "rejected": ExitCode.NOT_SERVED,
    "failed": ExitCode.AGENT_FAILED,
}
GONE = "SELECT 1 FROM sessions WHERE id = %s"


def unrecorded_refusal(session_id: UUID, reason: str) -> dict[str, Any]:
    """The outcome document of a request refused without being recorded (paused, expired,
    awaiting payment, busy, lease lost): no request id, state `rejected`, exit code 5."""
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


def _record(
    conn: psycopg.Connection,
    lease: SessionLease[Any],
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
    context: int,
    chain: RequestChain | None,
) -> RequestOutcome:
    """Write the outcome and release (or, in a chain, keep) the lease, in one statement;
    nothing when it was lost."""
    session_id = lease.session_id
    reason = reply.text if reply.state == "rejected" else None
    error = reply.text if reply.state == "failed" else None
    params = lease.params | {
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
        "renew": lease.hold_seconds if chain is not None else None,
        "context": context,
        "commit": None if chain is None or chain.durable else "off",
    }
    sent = time.monotonic()
    row = conn.execute(RECORD, params).fetchone()
    if row is None:
        lease.released()  # lost to another request
        if conn.execute(GONE, (session_id,)).fetchone() is None:
            raise NotServed(f"session {session_id} is gone")
        raise LeaseLost(
            f"session {session_id}: this request's lease ran out before its outcome was "
            "written, and another request holds the session now; nothing was recorded "
            "or charged",
            hint=f"the lease lasts the agent deadline + {MARGIN_SECONDS:g}s; retry",
        )
    rid, debited, balance_after, state, kept, roles, contents, counts, _commit = row
    if chain is not None:
        chain.unsettled = not chain.durable
    if kept and chain is not None:
        lease.kept(sent)
        chain.next_start = (state, balance_after, _history(roles, contents, counts))
    else:
        lease.released()  # by the statement above
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
    chain: RequestChain | None = None,
) -> RequestOutcome:
    """Serve one request on a session (the caller has authorised it); `chain`: one of a
    batch's (the lease may be kept for the next, and is then the batch's to give back)."""
    pricing = pricing or Pricing()
    limits = limits or RequestLimits()
    validate_message(message, limits)
    key = validate_idempotency_key(idempotency_key)
    lease: SessionLease[None] = (
        chain.lease
        if chain is not None
        else SessionLease(
            conn,
            session_id,
            hold_seconds=hold_seconds(agent.name, limits.agent_timeout_seconds),
            wait_seconds=limits.busy_wait_seconds,
        )
    )
    # A key must be looked up under the lease: such a request always asks the server.
    start = chain.kept_start() if chain is not None and key is None else None
    try:
        if start is not None:
            state, balance, recent = start
        else:
            params = lease.params | {"key": key, "context": limits.context_messages}
            row = lease.take_by(TAKE, params)
            _outcome, _left, state, balance, roles, contents, counts, *replayed = row
            earlier = _replay(session_id, message, key, replayed) if key else None
            if earlier is not None:
                return earlier
            recent = _history(roles, contents, counts)
        if state in ("expired", "awaiting_payment"):
            raise NotServed(f"session {session_id} is {state.replace('_', ' ')}")
        if state == "paused":
            raise NotServed(f"session {session_id} is paused", hint="top it up to resume")
        return _serve(
            conn, lease, message, agent, key, state, balance, recent, pricing, limits, chain
        )
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
    state: str,
    balance: int,
    recent: History,
    pricing: Pricing,
    limits: RequestLimits,
    chain: RequestChain | None,
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
        "chain": chain,
    }
    if minimum > balance:
        reason = (
            f"insufficient balance: this request costs at least {minimum} sats "
            f"and the session holds {balance}"
        )
        return _record(
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
    return _record(
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
