"""`towerctl report`: what the store took over a window, per hour or day (operator)."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime
from typing import Literal

import typer

from towerctl import report as reports
from towerctl.cli.params import JSON_OPTION, moment_option
from towerctl.cli.state import print_json, read_connect
from towerctl.render import write_aligned, write_bar_chart, write_csv

ReportFormat = Literal["table", "json", "csv"]
STATES = ("complete", "rejected", "failed")


def report(
    ctx: typer.Context,
    since: datetime | None = moment_option(
        "--since", "From this time: ISO (2026-12-07T10:00Z) or a duration ago (12h, 1d). [1d]"
    ),
    until: datetime | None = moment_option("--until", "Up to this time (default: now)."),
    by: Literal["hour", "day"] = typer.Option("hour", "--by", help="One period per UTC hour/day."),
    fmt: ReportFormat = typer.Option("table", "--format", "-f", help="Output format."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Deposits, top-ups and debits in sats, and requests by state and agent, per period."""
    found = reports.build_report(read_connect(ctx), since, until, by)
    if as_json or fmt == "json":
        print_json(found.as_json())
        return
    agents = sorted(found.totals.agents)
    states = sorted(set(STATES) | set(found.totals.requests))
    headers = ["start", "depositSats", "topupSats", "debitedSats", "requests", *states]
    rows = [
        [p.start, p.deposit_sats, p.topup_sats, p.debited_sats, sum(p.requests.values()),
         *(p.requests.get(s, 0) for s in states)]
        for p in found.periods
    ]  # fmt: skip
    if fmt == "csv":
        agent_rows = [[*r, *(p.agents.get(a, 0) for a in agents)] for r, p in zip(
            rows, found.periods, strict=True)]  # fmt: skip
        write_csv([*headers, *(f"agent:{a}" for a in agents)], agent_rows, sys.stdout)
        return
    out = sys.stdout
    on_terminal = out.isatty()
    t = found.totals
    out.write(
        f"From {found.since:%Y-%m-%d %H:%M} to {found.until:%Y-%m-%d %H:%M} UTC, by {by}\n"
        f"deposits {t.deposit_sats:,} sats, top-ups {t.topup_sats:,}, "
        f"debits {t.debited_sats:,}; {sum(t.requests.values()):,} requests\n\n"
    )
    if on_terminal:
        label = "%Y-%m-%d %H:00" if by == "hour" else "%Y-%m-%d"
        bars = [(p.start.strftime(label), p.debited_sats) for p in found.periods]
        width = max(shutil.get_terminal_size((100, 24)).columns, 60)
        out.write("Debits (sats) per period\n")
        write_bar_chart(bars, out, color=not os.environ.get("NO_COLOR"), width=width)
        out.write("\n")
    write_aligned(["start", "deposit", "topup", "debited", "requests", *states], rows, out)
    if agents:
        out.write("\nRequests by agent\n")
        write_aligned(["agent", "requests"], [[a, t.agents[a]] for a in agents], out)
