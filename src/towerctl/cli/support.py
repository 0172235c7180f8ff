"""`towerctl session requests` and `session find`: what support asks of the store.

Operator commands (the database URL, no macaroon), like `session list`.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Literal

import typer

from towerctl import accounts, search
from towerctl.cli.params import (
    JSON_OPTION,
    Role,
    SessionState,
    count_option,
    message_id_option,
    moment_option,
    session_id_argument,
)
from towerctl.cli.session import app
from towerctl.cli.state import note, print_json, read_connect
from towerctl.render import write_aligned, write_csv, write_search_matches
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


@app.command("find")
def find(
    ctx: typer.Context,
    text: str = typer.Argument(
        ..., metavar="TEXT", help='Words to find: "a phrase", or, -word (websearch syntax).'
    ),
    since: datetime | None = moment_option(
        "--since", "Messages from this time: ISO or a duration ago (12h, 1d)."
    ),
    until: datetime | None = moment_option("--until", "Messages before this time."),
    state: SessionState | None = typer.Option(None, "--state", help="Sessions in this state."),
    role: Role | None = typer.Option(None, "--role", help="Only this role's messages."),
    limit: int = count_option(20, "--limit", 1_000, "At most this many matches."),
    after: int | None = message_id_option("--after", "The cursor a page before ended with."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Find messages by their words (full-text search), newest first, with snippets."""
    page = search.find_messages(
        read_connect(ctx),
        text,
        since=since,
        until=until,
        state=state,
        role=role,
        limit=limit,
        after=after,
    )
    if as_json:
        print_json(page.as_json())
        return
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    write_search_matches(page.matches, sys.stdout, color=color)
    if not page.matches:
        note("no messages match")
    if page.next_cursor is not None:
        note(f"more matches follow: --after {page.next_cursor}")
