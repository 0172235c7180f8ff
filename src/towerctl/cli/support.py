"""`towerctl session requests` and `session find`: what support asks of the store.

Operator commands (the database URL, no macaroon), like `session list`.
"""

from __future__ import annotations

import sys
from typing import Literal

import typer

from towerctl.cli.params import JSON_OPTION, session_id_argument
from towerctl.cli.session import app
from towerctl.cli.state import print_json, read_connect
from towerctl.session_ids import SessionRef

TableFormat = Literal["table", "json", "csv"]
FORMAT_OPTION = typer.Option("table", "--format", "-f", help="Output format.")

REQUEST_COLUMNS = ["request", "state", "in", "out", "cost", "debited", "balance after", "time"]
LEDGER_COLUMNS = ["kind", "sats", "request", "time"]
CSV_COLUMNS = [
    "record",
    "requestId",
    "state",
    "inputTokens",
    "outputTokens",
    "costSats",
    "debitedSats",
    "balanceAfterSats",
    "kind",
    "amountSats",
    "createdAt",
]


@app.command("requests")
def requests(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument(),
    fmt: TableFormat = FORMAT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """A session's requests (tokens, cost, debit, balance after) and its ledger rows."""
    from towerctl import accounts
    from towerctl.render import write_aligned, write_csv

    account = accounts.session_account(read_connect(ctx), session_id)
    if as_json or fmt == "json":
        print_json(account.as_json())
        return
    if fmt == "csv":
        rows = [
            ["request", r.request_id, r.state, r.input_tokens, r.output_tokens, r.cost_sats,
             r.debited_sats, r.balance_after_sats, None, None, r.created_at]
            for r in account.requests
        ] + [
            ["ledger", e.request_id, None, None, None, None, None, None, e.kind, e.amount_sats,
             e.created_at]
            for e in account.ledger
        ]  # fmt: skip
        write_csv(CSV_COLUMNS, rows, sys.stdout)
        return
    out = sys.stdout
    out.write(f"Session {account.session_id}\n\nRequests\n")
    charges = [
        [r.request_id, r.state, r.input_tokens, r.output_tokens, r.cost_sats,
         r.debited_sats, r.balance_after_sats, r.created_at]
        for r in account.requests
    ]  # fmt: skip
    write_aligned(REQUEST_COLUMNS, charges, out)
    out.write("\nLedger\n")
    write_aligned(
        LEDGER_COLUMNS,
        [[e.kind, e.amount_sats, e.request_id, e.created_at] for e in account.ledger],
        out,
    )
    debited = sum(e.amount_sats for e in account.ledger if e.kind == "debit")
    paid_in = sum(e.amount_sats for e in account.ledger if e.kind != "debit")
    out.write(f"\n{paid_in:,} sats paid in, {debited:,} debited, {paid_in - debited:,} left\n")
