"""The write of one session request's outcome (migration 0012's
`towerctl_write_request`): the request row, the debit, the balance and both messages,
and the lease given back (or, in a batch, kept), in one statement; and the outcome
as the contract shows it (`RequestOutcome`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.agents import AgentReply
from towerctl.config import Pricing
from towerctl.errors import ExitCode, NotServed
from towerctl.requests.lease import MARGIN_SECONDS, LeaseLost, SessionLease
from towerctl.requests.rules import message_digest, tokens

if TYPE_CHECKING:
    import psycopg

History = list[tuple[str, str, int]]  # (role, content, tokens), newest first
Start = tuple[str, int, History]  # state, balance, history: what a request starts from

# The outcome's write (migration 0012, after 0011's): the request row, the debit, the
# balance and both messages, only while this request holds the lease (no row otherwise);
# the lease given back, or, in a batch (renew), kept for the next request with the
# state and history it needs: (id, debited, balance after, state, kept, three arrays).
RECORD = """
SELECT * FROM towerctl_write_request(
    %(sid)s::uuid, %(me)s::uuid, %(state)s::text, %(agent)s::text, %(reason)s::text,
    %(error)s::text, %(in)s::integer, %(out)s::integer, %(cost)s::bigint, %(key)s::text,
    %(digest)s::text, %(pause)s::boolean, %(floor)s::bigint, %(user)s::text,
    %(user_tokens)s::integer, %(reply)s::text, %(reply_tokens)s::integer,
    %(renew)s::float8, %(context)s::integer)"""
GONE = "SELECT 1 FROM sessions WHERE id = %s"


@dataclass
class KeptLease:
    """A batch's lease on its session, kept by each write for the next request together
    with what that request starts from (so it starts without a round trip of its own).
    The batch gives it back when it ends (`with kept.lease:`); a killed batch's runs out."""

    lease: SessionLease
    start: Start | None = None

    def take_start(self) -> Start | None:
        """What the previous write read for this request, while its lease is surely ours."""
        start, self.start = self.start, None
        return start if start is not None and self.lease.still_kept() else None


def history(roles: list[str] | None, contents: list[str], counts: list[int]) -> History:
    return list(zip(roles, contents, counts, strict=True)) if roles else []


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
    truncated: bool = False  # cut at the budget (SPEC 15)

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
            "truncated": self.truncated,
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


def refusal(session_id: UUID, reason: str) -> RequestOutcome:
    """A request refused without being recorded: no request id, `rejected`, exit code 5."""
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
    )


def record(
    conn: psycopg.Connection,
    lease: SessionLease,
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
    kept: KeptLease | None,
) -> RequestOutcome:
    """Write the outcome and release (or, in a batch, keep) the lease, in one statement;
    nothing when it was lost."""
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
        "renew": lease.hold_seconds if kept is not None else None,
        "context": context,
    }
    sent = time.monotonic()
    row = conn.execute(RECORD, params).fetchone()
    return _recorded(conn, lease, row, sent, reply, reason, error, params, kept)


def _recorded(
    conn: psycopg.Connection,
    lease: SessionLease,
    row: Sequence[Any] | None,
    sent: float,
    reply: AgentReply,
    reason: str | None,
    error: str | None,
    params: dict[str, Any],
    kept: KeptLease | None,
) -> RequestOutcome:
    """The outcome of a write's row (None: the lease was lost, nothing written)."""
    session_id = lease.session_id
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
    rid, debited, balance_after, state, renewed, roles, contents, counts = row
    if renewed and kept is not None:
        lease.kept(sent)
        kept.start = (state, balance_after, history(roles, contents, counts))
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
        input_tokens=params["in"],
        output_tokens=params["out"],
        truncated=reply.truncated and reply.state == "complete",
    )
