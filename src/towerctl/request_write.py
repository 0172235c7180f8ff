"""The write of one session request's outcome (migration 0012's
`towerctl_write_request`): the request row, the debit, the balance and both messages,
and the lease given back (or, in a batch, kept), in one statement; and the outcome
as the contract shows it (`RequestOutcome`)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.agents import AgentReply
from towerctl.config import Pricing
from towerctl.errors import ExitCode, NotServed
from towerctl.lease import MARGIN_SECONDS, LeaseLost, SessionLease
from towerctl.request_chain import History, RequestChain, Start
from towerctl.request_rules import message_digest, tokens

if TYPE_CHECKING:
    import psycopg

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
GONE = "SELECT 1 FROM sessions WHERE id = %s"
# RECORD's parameters in order, for a write sent straight on libpq (`sender`).
RECORD_PARAMS = (
    "sid", "me", "state", "agent", "reason", "error", "in", "out", "cost", "key", "digest",
    "pause", "floor", "user", "user_tokens", "reply", "reply_tokens", "renew", "context",
    "commit",
)  # fmt: skip
RECORD_AHEAD = re.sub(
    r"%\((\w+)\)s", lambda m: f"${RECORD_PARAMS.index(m.group(1)) + 1}", RECORD
).encode()


def history(roles: list[str] | None, contents: list[str], counts: list[int]) -> History:
    return list(zip(roles, contents, counts, strict=True)) if roles else []


class Guessed(Exception):
    """The start a request was prepared from (the write before it ran ahead) proved wrong."""


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
    start: Start,
) -> RequestOutcome | None:
    """Write the outcome and release (or, in a chain, keep) the lease, in one statement;
    nothing when it was lost. None: the write runs ahead (`RequestChain`); its outcome
    joins `chain.done` when the chain catches up."""
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
    durable = chain is None or chain.durable
    ahead = chain is not None and chain.ahead and not durable
    # Sent straight on libpq: encoded now, while the write before it runs.
    send = sender(conn, params) if ahead else None
    # The write before this one (running ahead) is finished first; the parameters above
    # were built meanwhile (they need nothing of its row).
    if chain is not None and not chain.catch_up():
        raise Guessed()
    sent = time.monotonic()

    def finish(row: Sequence[Any] | None) -> RequestOutcome:
        return _recorded(conn, lease, row, sent, durable, reply, reason, error, params, chain)

    def finish_ahead(row: Sequence[Any] | None) -> RequestOutcome:
        """As `finish`, for a write read while the next line is being served: a refusal
        (its lease was lost, the session is gone) is this line's outcome, not an error
        of the next one."""
        try:
            return finish(row)
        except NotServed as refused:
            return refusal(lease.session_id, str(refused))

    if send is not None:
        assert chain is not None
        chain.run_ahead(send, finish_ahead, _left_by(start, params))
        return None
    return finish(conn.execute(RECORD, params).fetchone())


def sender(conn: psycopg.Connection, params: dict[str, Any]) -> Callable[[], Callable[[], Any]]:
    """The call that sends RECORD straight on libpq without waiting for its row, and
    returns the call that reads the row (None: no row), raising as `execute` would.
    Everything it needs is made here, before the write ahead of it is read, so that
    the server waits as little as possible between the two. Nothing else may use the
    connection in between (`RequestChain` reads it before anything else is sent)."""
    from psycopg import OperationalError, pq
    from psycopg.adapt import Transformer
    from psycopg.errors import error_from_result

    from towerctl.db import flush_sent, results_of_query_in_flight

    pgconn, encoding = conn.pgconn, conn.info.encoding
    values = [_text(params[name], encoding) for name in RECORD_PARAMS]

    def send() -> Callable[[], Any]:
        pgconn.send_query_params(RECORD_AHEAD, values)
        flush_sent(pgconn)
        return receive

    def receive() -> Any:
        try:
            results = results_of_query_in_flight(conn)
        except KeyboardInterrupt:  # as psycopg does: cancel, and read the query to its end
            with contextlib.suppress(Exception):
                pgconn.get_cancel().cancel()
                results_of_query_in_flight(conn)
            raise
        if not results or pgconn.status != pq.ConnStatus.OK:
            raise OperationalError("the server closed the connection unexpectedly")
        for result in results:
            if result.status == pq.ExecStatus.FATAL_ERROR:
                raise error_from_result(result, encoding=encoding)
        rows = Transformer(conn)
        rows.set_pgresult(results[0])
        return rows.load_row(0, tuple) if results[0].ntuples else None

    return send


def _text(value: Any, encoding: str) -> bytes | None:
    """A parameter as PostgreSQL's text input (RECORD casts every one), encoded as psycopg
    encodes text (UTF-8 for a SQL_ASCII database)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    return str(value).encode("utf-8" if encoding == "ascii" else encoding)


def _left_by(start: Start, params: dict[str, Any]) -> Start | None:
    """The start a write leaves for the next request when it keeps the lease, by the
    write's own rules (towerctl_write_request); None when it would not keep it."""
    state, balance, recent = start
    debited = min(params["cost"], balance) if params["state"] == "complete" else 0
    after = balance - debited
    if state != "active" or params["pause"] or after < params["floor"]:
        return None
    written = [
        (role, content, count)
        for role, content, count in (
            ("assistant", params["reply"], params["reply_tokens"]),
            ("user", params["user"], params["user_tokens"]),
        )
        if content != ""
    ]
    return ("active", after, (written + recent)[: params["context"]])


def _recorded(
    conn: psycopg.Connection,
    lease: SessionLease[Any],
    row: Sequence[Any] | None,
    sent: float,
    durable: bool,
    reply: AgentReply,
    reason: str | None,
    error: str | None,
    params: dict[str, Any],
    chain: RequestChain | None,
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
    rid, debited, balance_after, state, kept, roles, contents, counts, _commit = row
    if chain is not None:
        chain.unsettled = not durable
    if kept and chain is not None:
        lease.kept(sent)
        chain.next_start = (state, balance_after, history(roles, contents, counts))
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
    )
