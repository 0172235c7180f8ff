"""A session's account: its requests (tokens, cost, debit, balance after) and its ledger
rows (deposit, top-ups, debits): the answer to "why was I charged?" (SPEC 16).

`balance_after_sats` is stored with each request by the write that debits it; a row
without one (written before the column was filled) gets the ledger's running sum up
to the request's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl import sessions

if TYPE_CHECKING:
    import psycopg

    from towerctl.session_ids import SessionRef

REQUESTS = """
SELECT r.id, r.state, r.agent, r.input_tokens, r.output_tokens, r.cost_sats, r.debited_sats,
       coalesce(r.balance_after_sats, (
           SELECT coalesce(sum(CASE l.kind WHEN 'debit' THEN -l.amount_sats
                                           ELSE l.amount_sats END), 0)::bigint
           FROM balance_ledger l
           WHERE l.session_id = r.session_id AND l.created_at <= r.created_at)),
       r.created_at
FROM session_requests r
WHERE r.session_id = %s
ORDER BY r.id"""
LEDGER = """
SELECT kind, amount_sats, session_request_id, created_at
FROM balance_ledger WHERE session_id = %s ORDER BY id"""


@dataclass(frozen=True)
class RequestCharge:
    request_id: int
    state: str
    agent: str
    input_tokens: int
    output_tokens: int
    cost_sats: int
    debited_sats: int
    balance_after_sats: int
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "requestId": self.request_id,
            "state": self.state,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "costSats": self.cost_sats,
            "debitedSats": self.debited_sats,
            "balanceAfterSats": self.balance_after_sats,
            "createdAt": self.created_at,
        }


@dataclass(frozen=True)
class LedgerEntry:
    kind: str  # deposit, topup, debit
    amount_sats: int
    request_id: int | None
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "amountSats": self.amount_sats,
            "requestId": self.request_id,
            "createdAt": self.created_at,
        }


@dataclass(frozen=True)
class Account:
    session_id: UUID
    requests: tuple[RequestCharge, ...]
    ledger: tuple[LedgerEntry, ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "sessionId": str(self.session_id),
            "requests": [r.as_json() for r in self.requests],
            "ledger": [e.as_json() for e in self.ledger],
        }


def session_account(conn: psycopg.Connection, session_id: SessionRef | UUID) -> Account:
    """One session's requests and ledger rows, oldest first (exit 4 for no such session).
    Read in one snapshot, so the two agree."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        sid = sessions.get_session(conn, session_id).id
        requests = tuple(RequestCharge(*r) for r in conn.execute(REQUESTS, (sid,)))
        ledger = tuple(LedgerEntry(*r) for r in conn.execute(LEDGER, (sid,)))
    return Account(sid, requests, ledger)
