"""Hostile input: whatever is thrown at towerctl, the outcome is one of the contract's
exit codes 2-8 (or success), never 1, never a traceback, and nothing is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import CLI, ROOT_KEY_HEX, OpenedSession, open_session
from towerctl.errors import ExitCode

FIXTURES_OK = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NOT_A_FLAG = st.text(max_size=80).filter(lambda s: not s.startswith("-"))


def table_counts(url: str) -> tuple[int, ...]:
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM session_requests),"
            " (SELECT count(*) FROM session_messages), (SELECT count(*) FROM balance_ledger)"
        ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture
def session(cli: CLI) -> OpenedSession:
    return open_session(cli, 1_000_000)


@FIXTURES_OK
@given(NOT_A_FLAG)
def test_arbitrary_session_ids(cli: CLI, db_url: str, text: str) -> None:
    before = table_counts(db_url)
    for args in (["session", "show", text], ["session", "topup", text, "--sats", "5"]):
        result = cli(*args)
        assert result.exit_code in (ExitCode.BAD_INPUT, ExitCode.NOT_FOUND), result.stderr
    assert table_counts(db_url) == before


@FIXTURES_OK
@given(st.text(max_size=30).filter(lambda s: not s.startswith("-")))
def test_arbitrary_amounts(cli: CLI, db_url: str, amount: str) -> None:
    result = cli("session", "open", "--deposit", amount, "--json")
    try:
        valid = 1 <= int(amount.strip()) <= 100_000_000
    except ValueError:
        valid = False
    if result.exit_code == ExitCode.OK:
        assert valid, amount
        assert json.loads(result.stdout)["balanceSats"] == int(amount.strip())
    else:
        assert result.exit_code == ExitCode.BAD_INPUT, result.stderr


@FIXTURES_OK
@given(NOT_A_FLAG)
def test_arbitrary_durations(cli: CLI, session: OpenedSession, ttl: str) -> None:
    result = cli("macaroon", "mint", session.id, "--ttl", ttl)
    assert result.exit_code in (ExitCode.OK, ExitCode.BAD_INPUT), result.stderr
    if result.exit_code == ExitCode.OK:
        assert ttl.strip()[-1] in "smhd"


@FIXTURES_OK
@given(
    st.one_of(
        st.text(max_size=300),
        st.sampled_from(
            [
                "'; DROP TABLE sessions; --",
                "$$ $tag$ \\ %s %(x)s {0} ${x}",
                "\x00",
                "a\x00b",
                "\ud800 lone surrogate",
                "\x1b[2J\x1b[H clear screen",
                "\u202e right-to-left override",
                " \t\n ",
            ]
        ),
    )
)
def test_arbitrary_messages_are_refused_or_stored_verbatim(
    cli: CLI, db_url: str, session: OpenedSession, message: str
) -> None:
    assume(not message.startswith("-"))
    before = table_counts(db_url)
    result = cli("session", "request", session.id, message, "--macaroon", session.macaroon)
    if result.exit_code == ExitCode.OK:
        with psycopg.connect(db_url) as c:
            row = c.execute(
                "SELECT content FROM session_messages WHERE role = 'user' ORDER BY id DESC LIMIT 1"
            ).fetchone()
        assert row == (message,)
        assert result.stdout == message + "\n"
    else:
        assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
        assert table_counts(db_url) == before


def test_huge_message_is_refused_before_anything_is_written(
    cli: CLI, db_url: str, session: OpenedSession
) -> None:
    before = table_counts(db_url)
    result = cli(
        "session", "request", session.id, "-", "--macaroon", session.macaroon, input="x" * 1_000_000
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "32,000" in result.stderr
    assert table_counts(db_url) == before


@FIXTURES_OK
@given(st.lists(st.one_of(st.text(max_size=60), st.binary(max_size=60).map(repr)), max_size=5))
def test_arbitrary_ndjson_batches(
    cli: CLI, db_url: str, session: OpenedSession, lines: list[str]
) -> None:
    text = "\n".join(line.replace("\n", " ") for line in lines) + "\n"
    result = cli(
        "session", "request", session.id, "--batch", "--macaroon", session.macaroon, input=text
    )
    assert result.exit_code in (ExitCode.OK, ExitCode.BAD_INPUT, ExitCode.NOT_SERVED)
    for line in result.stdout.splitlines():
        assert json.loads(line)["sessionId"] == session.id


@FIXTURES_OK
@given(st.text(max_size=200))
def test_arbitrary_migration_sql(
    cli: CLI, empty_db_url: str, tmp_path_factory: pytest.TempPathFactory, sql: str
) -> None:
    folder = tmp_path_factory.mktemp("sql")
    (folder / "0001_fuzz.sql").write_text(sql.replace("\x00", ""))
    result = cli(
        "--database-url", empty_db_url, "migrate", "--dir", str(folder), "--lock-timeout", "5"
    )
    assert result.exit_code in (ExitCode.OK, ExitCode.MIGRATION), result.stderr


def test_dir_pointing_at_odd_files(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    cases = {}
    a_dir = tmp_path / "dir_named_sql"
    (a_dir / "0001_x.sql").mkdir(parents=True)
    cases["directory named like a migration"] = a_dir
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "0001_x.sql")
    cases["fifo"] = fifo_dir
    loop_dir = tmp_path / "loop"
    loop_dir.mkdir()
    (loop_dir / "0001_x.sql").symlink_to(loop_dir / "0001_x.sql")
    cases["symlink loop"] = loop_dir
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    cases["a file instead of a folder"] = a_file
    huge = tmp_path / "bignum"
    huge.mkdir()
    (huge / ("9" * 40 + "_x.sql")).write_text("SELECT 1;")
    cases["a version beyond bigint"] = huge
    for name, folder in cases.items():
        result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
        assert result.exit_code == ExitCode.MIGRATION, (name, result.stderr)


@FIXTURES_OK
@given(st.text(max_size=120))
def test_arbitrary_database_urls(cli: CLI, url: str) -> None:
    assume(not url.startswith("-") and "\x00" not in url)
    result = cli("--database-url", url + " connect_timeout=1", "migrate", "status")
    assert result.exit_code in (ExitCode.UNREACHABLE, ExitCode.BAD_INPUT, ExitCode.OK)


# --- secrets ----------------------------------------------------------------------------------


def test_secrets_never_appear_in_output(
    cli: CLI, db_url: str, session: OpenedSession, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    password = "pa55-w0rd-very-secret"
    runs = [
        cli("--database-url", f"postgresql://op:{password}@127.0.0.1:1/x", "session", "list"),
        cli("--database-url", f"host=127.0.0.1 port=1 password={password}", "doctor"),
        cli("session", "request", session.id, "hi", "--macaroon", session.macaroon[:-3] + "AAA"),
        cli(
            "macaroon",
            "verify",
            session.macaroon,
            "--session",
            "00000000-0000-4000-8000-000000000000",
        ),
        cli("macaroon", "inspect", session.macaroon, "--json"),
        cli("session", "messages", session.id, "--format", "xml", "--macaroon", session.macaroon),
    ]
    monkeypatch.setenv("TOWER_ROOT_KEY", ROOT_KEY_HEX[:-2])
    runs.append(cli("macaroon", "mint", session.id))
    signature = __import__("pymacaroons").Macaroon.deserialize(session.macaroon).signature
    for result in runs:
        text = result.stdout + result.stderr
        assert password not in text
        assert ROOT_KEY_HEX[:16] not in text
        assert session.macaroon not in text
        assert signature not in text
    assert all(r.exit_code != ExitCode.INTERNAL for r in runs)
