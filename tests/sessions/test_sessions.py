"""Sessions and the balance ledger, through the CLI against real PostgreSQL."""

from __future__ import annotations

import json

import psycopg
import pytest

from conftest import CLI, assert_store_consistent, open_session
from towerctl.errors import ExitCode

SHAPE = {"sessionId", "state", "balanceSats", "createdAt", "expiresAt"}


def test_open_prints_id_macaroon_and_records_the_deposit(cli: CLI, db_url: str) -> None:
    result = cli("session", "open", "--deposit", "250", "--json")
    assert result.exit_code == ExitCode.OK
    doc = json.loads(result.stdout)
    assert set(doc) == SHAPE | {"macaroon"}
    assert doc["state"] == "active" and doc["balanceSats"] == 250
    with psycopg.connect(db_url) as c:
        ledger = c.execute(
            "SELECT kind, amount_sats FROM balance_ledger WHERE session_id = %s",
            (doc["sessionId"],),
        ).fetchall()
    assert ledger == [("deposit", 250)]
    inspect = cli("macaroon", "inspect", doc["macaroon"], "--json")
    token = json.loads(inspect.stdout)
    assert token["sessionId"] == doc["sessionId"]
    assert token["scopes"] == ["read", "request"]
    assert_store_consistent(db_url)


def test_open_plain_output_names_id_and_token(cli: CLI) -> None:
    result = cli("session", "open", "--deposit", "10")
    assert result.exit_code == ExitCode.OK
    assert "sessionId" in result.stdout and "macaroon" in result.stdout


def test_show_list_and_topup_shapes(cli: CLI, db_url: str) -> None:
    first = open_session(cli, 100)
    second = open_session(cli, 300)
    shown = json.loads(cli("session", "show", first.id, "--json").stdout)
    assert set(shown) == SHAPE and shown["balanceSats"] == 100
    listed = json.loads(cli("session", "list", "--json").stdout)
    assert [s["sessionId"] for s in listed["sessions"]] == [second.id, first.id]
    assert all(set(s) == SHAPE for s in listed["sessions"])
    limited = json.loads(cli("session", "list", "--limit", "1", "--json").stdout)
    assert len(limited["sessions"]) == 1
    topped = cli("session", "topup", first.id, "--sats", "50", "--json")
    assert topped.exit_code == ExitCode.OK
    assert json.loads(topped.stdout)["balanceSats"] == 150
    assert_store_consistent(db_url)


def test_topup_reactivates_a_paused_session(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 100)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE sessions SET state = 'paused' WHERE id = %s", (s.id,))
    paused = json.loads(cli("session", "list", "--state", "paused", "--json").stdout)
    assert [x["sessionId"] for x in paused["sessions"]] == [s.id]
    doc = json.loads(cli("session", "topup", s.id, "--sats", "5", "--json").stdout)
    assert doc["state"] == "active" and doc["balanceSats"] == 105
    assert_store_consistent(db_url)


def test_expiry_is_applied_lazily_and_blocks_topup(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 100)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(
            "UPDATE sessions SET expires_at = now() - interval '1 second',"
            " created_at = now() - interval '2 days' WHERE id = %s",
            (s.id,),
        )
    shown = json.loads(cli("session", "show", s.id, "--json").stdout)
    assert shown["state"] == "expired"
    refused = cli("session", "topup", s.id, "--sats", "10")
    assert refused.exit_code == ExitCode.NOT_SERVED
    assert "expired" in refused.stderr
    assert json.loads(cli("session", "show", s.id, "--json").stdout)["balanceSats"] == 100
    assert_store_consistent(db_url)


@pytest.mark.parametrize(
    "args",
    [
        ["session", "open", "--deposit", "0"],
        ["session", "open", "--deposit", "-5"],
        ["session", "open", "--deposit", "1.5"],
        ["session", "open", "--deposit", "abc"],
        ["session", "open", "--deposit", "100000001"],
        ["session", "open"],
        ["session", "list", "--state", "sleeping"],
        ["session", "list", "--limit", "0"],
        ["session", "show", "not-a-uuid"],
        ["session", "topup", "'; DROP TABLE sessions; --", "--sats", "5"],
    ],
)
def test_bad_input_exits_2_and_writes_nothing(cli: CLI, db_url: str, args: list[str]) -> None:
    result = cli(*args)
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
    assert result.stderr.startswith("towerctl: ")
    assert len(result.stderr.strip().splitlines()) == 1
    with psycopg.connect(db_url) as c:
        assert c.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


@pytest.mark.parametrize("sats", ["0", "-1", "x", "100000001"])
def test_bad_topup_amount_changes_nothing(cli: CLI, db_url: str, sats: str) -> None:
    s = open_session(cli, 100)
    assert cli("session", "topup", s.id, "--sats", sats).exit_code == ExitCode.BAD_INPUT
    assert json.loads(cli("session", "show", s.id, "--json").stdout)["balanceSats"] == 100
    assert_store_consistent(db_url)


def test_unknown_session_exits_4(cli: CLI) -> None:
    unknown = "00000000-0000-4000-8000-000000000000"
    for args in (
        ["session", "show", unknown],
        ["session", "topup", unknown, "--sats", "5"],
        ["macaroon", "mint", unknown],
    ):
        result = cli(*args)
        assert result.exit_code == ExitCode.NOT_FOUND, args
        assert unknown in result.stderr
