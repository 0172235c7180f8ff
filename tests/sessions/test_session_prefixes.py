"""Session ids by a unique prefix of 8+ hex digits, as git and docker take ids (SPEC 16)."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from conftest import CLI, open_session
from towerctl.errors import ExitCode
from towerctl.session_ids import parse


def _insert(conn: psycopg.Connection, session_id: str, sats: int = 100) -> None:
    conn.execute(
        "INSERT INTO sessions (id, state, balance_sats) VALUES (%s, 'active', %s)",
        (session_id, sats),
    )
    conn.execute(
        "INSERT INTO balance_ledger (session_id, kind, amount_sats) VALUES (%s, 'deposit', %s)",
        (session_id, sats),
    )


def test_a_unique_prefix_resolves_everywhere_an_id_is_taken(cli: CLI) -> None:
    s = open_session(cli, 100)
    for prefix in (s.id[:8], s.id[:13], s.id[:13].replace("-", ""), s.id[:10].upper()):
        shown = cli("session", "show", prefix, "--json")
        assert shown.exit_code == ExitCode.OK, (prefix, shown.stderr)
        assert json.loads(shown.stdout)["sessionId"] == s.id
    topped = cli("session", "topup", s.id[:8], "--sats", "5", "--json")
    assert json.loads(topped.stdout)["balanceSats"] == 105
    minted = cli("macaroon", "mint", s.id[:9])
    assert minted.exit_code == ExitCode.OK
    verified = cli("macaroon", "verify", minted.stdout.strip(), "--session", s.id[:8])
    assert verified.exit_code == ExitCode.OK, verified.stderr
    asked = cli("session", "request", s.id[:8], "hello", "--macaroon", s.macaroon)
    assert asked.exit_code == ExitCode.OK, asked.stderr
    read = cli("session", "messages", s.id[:8], "--format", "json", "--macaroon", s.macaroon)
    assert read.exit_code == ExitCode.OK, read.stderr
    doc = json.loads(read.stdout)
    assert doc["sessionId"] == s.id and len(doc["messages"]) == 2


def test_a_prefix_of_another_session_than_the_macaroons_is_refused(cli: CLI) -> None:
    mine, other = open_session(cli), open_session(cli)
    refused = cli("session", "messages", other.id[:8], "--macaroon", mine.macaroon)
    assert refused.exit_code == ExitCode.UNAUTHORIZED
    assert "another session" in refused.stderr


def test_an_ambiguous_prefix_exits_2_naming_how_many_match(
    cli: CLI, conn: psycopg.Connection
) -> None:
    shared = "3e137fe9"
    for tail in ("-0000-4000-8000-000000000001", "-0000-4000-8000-000000000002"):
        _insert(conn, shared + tail)
    result = cli("session", "show", shared)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "ambiguous" in result.stderr and "2 sessions" in result.stderr
    longer = cli("session", "show", shared + "-0000-4000-8000-00000000000", "--json")
    assert longer.exit_code == ExitCode.BAD_INPUT
    whole = cli("session", "show", shared + "-0000-4000-8000-000000000002", "--json")
    assert whole.exit_code == ExitCode.OK


def test_a_prefix_matching_nothing_exits_4(cli: CLI) -> None:
    open_session(cli)
    result = cli("session", "show", uuid.uuid4().hex[:8] + "0000")
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "no session id starts with" in result.stderr


@pytest.mark.parametrize("text", ["3e137fe", "abc", "3e13-7fe9", "3e137fezz", "-3e137fe9"])
def test_short_or_malformed_prefixes_are_usage_errors(cli: CLI, text: str) -> None:
    result = cli("session", "show", text)
    assert result.exit_code == ExitCode.BAD_INPUT


def test_the_prefix_is_a_range_on_the_primary_key() -> None:
    ref = parse("3E137FE9-1a")
    assert ref.full is None
    assert str(ref.lower) == "3e137fe9-1a00-0000-0000-000000000000"
    assert str(ref.upper) == "3e137fe9-1aff-ffff-ffff-ffffffffffff"


def test_the_lookup_uses_the_primary_key_index(conn: psycopg.Connection) -> None:
    from towerctl.session_ids import IN_RANGE

    ref = parse("3e137fe9")
    conn.execute("SET enable_seqscan = off")
    plan = conn.execute("EXPLAIN " + IN_RANGE, (ref.lower, ref.upper)).fetchall()
    assert "sessions_pkey" in "\n".join(r[0] for r in plan)
