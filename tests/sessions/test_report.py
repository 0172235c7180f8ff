"""`towerctl report`: the money and the requests per period equal the store's SQL sums."""

from __future__ import annotations

import csv
import io
import itertools
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from conftest import CLI
from towerctl.errors import ExitCode
from towerctl.render import write_bar_chart

NOW = datetime.now(UTC)
AGENTS = ("echo", "exec:./bot", "openai:https://api.example")


def _seed(conn: psycopg.Connection, sessions: int = 12, seed: int = 7) -> None:
    """Sessions, deposits, top-ups, requests and debits spread over the last three days."""
    rng = random.Random(seed)
    for _ in range(sessions):
        sid = uuid.uuid4()
        opened = NOW - timedelta(minutes=rng.randrange(60, 3 * 24 * 60))
        deposit = rng.randrange(100, 1000)
        conn.execute(
            "INSERT INTO sessions (id, state, balance_sats, created_at, last_activity_at,"
            " expires_at) VALUES (%s, 'active', %s, %s, %s, now() + interval '1 day')",
            (sid, deposit, opened, opened),
        )
        conn.execute(
            "INSERT INTO balance_ledger (session_id, kind, amount_sats, created_at)"
            " VALUES (%s, 'deposit', %s, %s)",
            (sid, deposit, opened),
        )
        balance = deposit
        for _ in range(rng.randrange(0, 6)):
            at = opened + timedelta(minutes=rng.randrange(1, 50))
            if rng.random() < 0.2:
                conn.execute(
                    "INSERT INTO balance_ledger (session_id, kind, amount_sats, created_at)"
                    " VALUES (%s, 'topup', %s, %s)",
                    (sid, 50, at),
                )
                balance += 50
                continue
            state = rng.choice(("complete", "complete", "rejected", "failed"))
            debit = min(rng.randrange(1, 40), balance) if state == "complete" else 0
            balance -= debit
            (rid,) = conn.execute(
                "INSERT INTO session_requests (session_id, state, agent, cost_sats, debited_sats,"
                " balance_after_sats, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " RETURNING id",
                (sid, state, rng.choice(AGENTS), debit, debit, balance, at),
            ).fetchone()
            if debit:
                conn.execute(
                    "INSERT INTO balance_ledger (session_id, kind, amount_sats,"
                    " session_request_id, created_at) VALUES (%s, 'debit', %s, %s, %s)",
                    (sid, debit, rid, at),
                )
        conn.execute("UPDATE sessions SET balance_sats = %s WHERE id = %s", (balance, sid))


def _sql_totals(conn: psycopg.Connection, since: datetime, until: datetime) -> dict[str, object]:
    money = dict(
        conn.execute(
            "SELECT kind, sum(amount_sats)::bigint FROM balance_ledger"
            " WHERE created_at >= %s AND created_at < %s GROUP BY kind",
            (since, until),
        ).fetchall()
    )
    where = " FROM session_requests WHERE created_at >= %s AND created_at < %s"
    states = dict(conn.execute(f"SELECT state, count(*){where} GROUP BY 1", (since, until)))
    agents = dict(conn.execute(f"SELECT agent, count(*){where} GROUP BY 1", (since, until)))
    return {
        "depositSats": money.get("deposit", 0),
        "topupSats": money.get("topup", 0),
        "debitedSats": money.get("debit", 0),
        "requests": states,
        "agents": agents,
    }


def test_totals_and_periods_equal_sql_sums(cli: CLI, conn: psycopg.Connection) -> None:
    _seed(conn)
    since, until = NOW - timedelta(days=2), NOW
    result = cli(
        "report", "--since", since.isoformat(), "--until", until.isoformat(), "--by", "day",
        "--json",
    )  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["totals"] == _sql_totals(conn, since, until)
    assert len(doc["periods"]) == 3  # a part of the first day, a whole day, today so far
    for key in ("depositSats", "topupSats", "debitedSats"):
        assert sum(p[key] for p in doc["periods"]) == doc["totals"][key]
    for p in doc["periods"]:
        assert set(p) == {"start", "depositSats", "topupSats", "debitedSats", "requests", "agents"}
        start = datetime.fromisoformat(p["start"])
        end = start + timedelta(days=1)
        part = _sql_totals(conn, max(start, since), min(end, until))
        assert {k: p[k] for k in part} == part


def test_default_is_the_last_day_by_hour(cli: CLI, conn: psycopg.Connection) -> None:
    _seed(conn, seed=3)
    doc = json.loads(cli("report", "--json").stdout)
    assert len(doc["periods"]) in (24, 25)
    starts = [datetime.fromisoformat(p["start"]) for p in doc["periods"]]
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(starts))
    since = datetime.fromisoformat(doc["since"])
    until = datetime.fromisoformat(doc["until"])
    assert until - since == timedelta(days=1)
    assert doc["totals"] == _sql_totals(conn, since, until)
    ago = json.loads(cli("report", "--since", "12h", "--json").stdout)
    assert len(ago["periods"]) in (12, 13)


def test_plain_text_on_a_pipe_and_csv(cli: CLI, conn: psycopg.Connection) -> None:
    _seed(conn, seed=5)
    plain = cli("report", "--since", "3d", "--by", "day")
    assert plain.exit_code == ExitCode.OK
    assert "debits" in plain.stdout and "\x1b" not in plain.stdout
    assert "█" not in plain.stdout and "Requests by agent" in plain.stdout
    as_csv = cli("report", "--since", "3d", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    doc = json.loads(cli("report", "--since", "3d", "--json").stdout)
    assert sum(int(r["debitedSats"]) for r in rows) == doc["totals"]["debitedSats"]
    assert sum(int(r["agent:echo"]) for r in rows) == doc["totals"]["agents"].get("echo", 0)


def test_bad_windows_are_usage_errors(cli: CLI) -> None:
    assert cli("report", "--since", "yesterday").exit_code == ExitCode.BAD_INPUT
    assert cli("report", "--since", "1h", "--until", "2h").exit_code == ExitCode.BAD_INPUT
    assert cli("report", "--by", "week").exit_code == ExitCode.BAD_INPUT
    assert cli("report", "--since", "366d").exit_code == ExitCode.OK
    assert cli("report", "--since", "2000-01-01").exit_code == ExitCode.BAD_INPUT  # too many hours


def test_the_chart_scales_bars_to_the_largest() -> None:
    out = io.StringIO()
    write_bar_chart([("a", 10), ("b", 5), ("c", 0)], out, color=False, width=60)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    full, half, none = (line.count("█") for line in lines)
    assert full > half > none == 0 and abs(full - 2 * half) <= 1
