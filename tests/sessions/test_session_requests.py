"""`session requests`: why was I charged? (SPEC 16)."""

from __future__ import annotations

import csv
import io
import json

import psycopg

from conftest import CLI, open_session
from towerctl.errors import ExitCode

REQUEST_KEYS = {
    "requestId",
    "state",
    "inputTokens",
    "outputTokens",
    "costSats",
    "debitedSats",
    "balanceAfterSats",
    "createdAt",
}
LEDGER_KEYS = {"kind", "amountSats", "requestId", "createdAt"}


def _ask(cli: CLI, session_id: str, macaroon: str, text: str) -> int:
    return cli("session", "request", session_id, text, "--macaroon", macaroon).exit_code


def test_debits_of_the_requests_sum_to_the_ledgers(cli: CLI, conn: psycopg.Connection) -> None:
    s = open_session(cli, 40)
    for i in range(3):
        _ask(cli, s.id, s.macaroon, f"question {i} " + "words " * 20)
    cli("session", "topup", s.id, "--sats", "25")
    for i in range(4):  # a paused session (balance run low) records nothing more
        _ask(cli, s.id, s.macaroon, f"again {i} " + "more words " * 30)
    result = cli("session", "requests", s.id[:8], "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == {"sessionId", "requests", "ledger"} and doc["sessionId"] == s.id
    assert len(doc["requests"]) >= 3
    assert all(set(r) == REQUEST_KEYS for r in doc["requests"])
    assert all(set(e) == LEDGER_KEYS for e in doc["ledger"])
    debits = [e for e in doc["ledger"] if e["kind"] == "debit"]
    assert sum(r["debitedSats"] for r in doc["requests"]) == sum(e["amountSats"] for e in debits)
    by_request = {e["requestId"]: e["amountSats"] for e in debits}
    for r in doc["requests"]:
        assert by_request.get(r["requestId"], 0) == r["debitedSats"]
    assert [e["kind"] for e in doc["ledger"] if e["kind"] != "debit"] == ["deposit", "topup"]
    # the balance after the last request is the session's balance (nothing came after it)
    (balance,) = conn.execute("SELECT balance_sats FROM sessions WHERE id = %s", (s.id,)).fetchone()
    assert doc["requests"][-1]["balanceAfterSats"] == balance
    sums = conn.execute(
        "SELECT sum(debited_sats), count(*) FROM session_requests WHERE session_id = %s", (s.id,)
    ).fetchone()
    assert sums == (sum(r["debitedSats"] for r in doc["requests"]), len(doc["requests"]))


def test_balance_after_falls_back_to_the_ledgers_running_sum(
    cli: CLI, conn: psycopg.Connection
) -> None:
    s = open_session(cli, 100)
    _ask(cli, s.id, s.macaroon, "hello there")
    stored = json.loads(cli("session", "requests", s.id, "--json").stdout)["requests"][0]
    conn.execute("UPDATE session_requests SET balance_after_sats = NULL")
    computed = json.loads(cli("session", "requests", s.id, "--json").stdout)["requests"][0]
    assert computed["balanceAfterSats"] == stored["balanceAfterSats"] == 100 - stored["debitedSats"]


def test_table_and_csv_forms(cli: CLI) -> None:
    s = open_session(cli, 100)
    _ask(cli, s.id, s.macaroon, "hello there")
    table = cli("session", "requests", s.id)
    assert table.exit_code == ExitCode.OK
    assert "Requests" in table.stdout and "Ledger" in table.stdout and "deposit" in table.stdout
    assert "balance after" in table.stdout
    as_csv = cli("session", "requests", s.id, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["record"] for r in rows] == ["request", "ledger", "ledger"]
    assert rows[1]["kind"] == "deposit" and rows[1]["amountSats"] == "100"
    as_json = cli("session", "requests", s.id, "--format", "json")
    assert json.loads(as_json.stdout)["sessionId"] == s.id


def test_an_unknown_session_exits_4(cli: CLI) -> None:
    result = cli("session", "requests", "00000000-0000-4000-8000-000000000000")
    assert result.exit_code == ExitCode.NOT_FOUND
