"""Hostile input: whatever is thrown at towerctl, the outcome is the exit code the
contract names for that input — computed here by an oracle independent of towerctl —
never 1, never a traceback, and nothing is written when it is refused."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import CLI, ROOT_KEY_HEX, OpenedSession, fresh_database, open_session
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
    try:
        uuid.UUID(text.strip())
        expected = ExitCode.NOT_FOUND  # a well-formed id of no session
    except ValueError:
        expected = ExitCode.BAD_INPUT
    for args in (["session", "show", text], ["session", "topup", text, "--sats", "5"]):
        result = cli(*args)
        assert result.exit_code == expected, (text, result.stderr)
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
    match = re.fullmatch(r"([1-9][0-9]{0,6})([smhd])", ttl.strip(), re.ASCII)
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)] if (
        match) else None  # fmt: skip
    valid = seconds is not None and seconds <= 366 * 86400
    assert result.exit_code == (ExitCode.OK if valid else ExitCode.BAD_INPUT), (ttl, result.stderr)


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


def valid_batch_line(line: str) -> bool:
    """The contract's batch line: a JSON object with a usable `message` string and at most
    an `idempotencyKey` string (1-200 characters) besides; nothing else."""
    try:
        doc = json.loads(line)
    except ValueError:
        return False
    if not isinstance(doc, dict) or not set(doc) <= {"message", "idempotencyKey"}:
        return False
    message, key = doc.get("message"), doc.get("idempotencyKey", "k")
    return (
        isinstance(message, str)
        and message.strip() != ""
        and "\x00" not in message
        and isinstance(key, str)
        and 1 <= len(key) <= 200
    )


@FIXTURES_OK
@given(
    st.lists(
        st.one_of(
            st.text(max_size=60),
            st.binary(max_size=60).map(repr),
            st.fixed_dictionaries({"message": st.text(max_size=20)}).map(json.dumps),
            st.fixed_dictionaries(
                {"message": st.text(min_size=1, max_size=20), "idempotency_key": st.just("k")}
            ).map(json.dumps),
        ),
        max_size=5,
    )
)
def test_arbitrary_ndjson_batches(
    cli: CLI, db_url: str, session: OpenedSession, lines: list[str]
) -> None:
    lines = [line.replace("\n", " ") for line in lines]
    text = "\n".join(lines) + "\n"
    result = cli(
        "session", "request", session.id, "--batch", "--macaroon", session.macaroon, input=text
    )
    requests = [line for line in lines if line.strip()]
    answered = 0
    for line in requests:
        if not valid_batch_line(line):
            break
        answered += 1
    expected = ExitCode.OK if answered == len(requests) else ExitCode.BAD_INPUT
    assert result.exit_code == expected, (lines, result.stderr)
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    if answered < len(requests):  # the bad line's own compact error line comes last
        assert outcomes.pop()["error"]["line"] >= answered + 1
    assert len(outcomes) == answered
    assert all(o["sessionId"] == session.id and o["state"] == "complete" for o in outcomes)


@FIXTURES_OK
@given(st.text(max_size=200))
def test_arbitrary_migration_sql(
    cli: CLI, server_url: str, tmp_path_factory: pytest.TempPathFactory, sql: str
) -> None:
    text = sql.replace("\x00", "")
    folder = tmp_path_factory.mktemp("sql")
    (folder / "0001_fuzz.sql").write_text(text)
    with fresh_database(server_url, None) as url:  # each example on an empty database
        # The oracle is the server: the text run in a transaction that is rolled back.
        with psycopg.connect(url) as c:
            try:
                c.execute(text.encode())
                server_accepts = True
            except psycopg.Error:
                server_accepts = False
            c.rollback()
        assume(server_accepts or text.strip() != "")  # an empty query is psycopg's refusal
        result = cli("--database-url", url, "migrate", "--dir", str(folder), "--lock-timeout", "5")
        expected = ExitCode.OK if server_accepts else ExitCode.MIGRATION
        assert result.exit_code == expected, (text, result.stderr)


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
    target = url + " connect_timeout=1"
    try:  # the oracle: libpq itself
        psycopg.connect(target).close()
        reachable = True
    except Exception:
        reachable = False
    assume(not reachable)  # a text that happens to name a live server is not hostile
    result = cli("--database-url", target, "migrate", "status")
    assert result.exit_code == ExitCode.UNREACHABLE, result.stderr


# --- secrets ----------------------------------------------------------------------------------


def test_secrets_never_appear_in_output(
    cli: CLI, db_url: str, session: OpenedSession, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    password = "pa55-w0rd-very-secret"
    other = "00000000-0000-4000-8000-000000000000"
    cases = [
        (("--database-url", f"postgresql://op:{password}@127.0.0.1:1/x", "session", "list"), 8),
        (("--database-url", f"host=127.0.0.1 port=1 password={password}", "doctor"), 8),
        (("session", "request", session.id, "hi", "--macaroon", session.macaroon[:-3] + "AAA"), 3),
        (("macaroon", "verify", session.macaroon, "--session", other), 3),
        (("macaroon", "inspect", session.macaroon, "--json"), 0),
        (("session", "messages", session.id, "--format", "xml", "--macaroon", session.macaroon), 2),
    ]
    runs = []
    for args, code in cases:
        runs.append(cli(*args))
        assert runs[-1].exit_code == code, (args[:3], runs[-1].stderr)
    monkeypatch.setenv("TOWER_ROOT_KEY", ROOT_KEY_HEX[:-2])
    runs.append(cli("macaroon", "mint", session.id))
    assert runs[-1].exit_code == ExitCode.BAD_INPUT
    signature = __import__("pymacaroons").Macaroon.deserialize(session.macaroon).signature
    for result in runs:
        text = result.stdout + result.stderr
        assert password not in text
        assert ROOT_KEY_HEX[:16] not in text
        assert session.macaroon not in text
        assert signature not in text


# --- numbers are ASCII digits; tokens are canonical -----------------------------------------

OTHER_DIGITS = ["١٠٠", "१००", "１００", "1_000", " 100", "+100", "1e2"]


@pytest.mark.parametrize("text", OTHER_DIGITS)
def test_only_ascii_digits_are_amounts_and_counts(cli: CLI, text: str) -> None:
    done = cli("session", "open", "--deposit", text)
    assert done.exit_code == ExitCode.BAD_INPUT, text
    assert "whole number" in done.stderr
    assert cli("session", "list", "--limit", text).exit_code == ExitCode.BAD_INPUT


@pytest.mark.parametrize("text", ["١٠", "1_0", "１０"])
def test_only_ascii_digits_are_numbers_in_the_environment(
    cli: CLI, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    session = open_session(cli)
    monkeypatch.setenv("TOWER_EVAL_FEE_SATS", text)
    done = cli("session", "request", session.id, "hi", "--macaroon", session.macaroon)
    assert done.exit_code == ExitCode.BAD_INPUT
    assert "TOWER_EVAL_FEE_SATS" in done.stderr


def test_an_expiry_written_in_other_digits_is_refused(cli: CLI) -> None:
    from pymacaroons import Macaroon
    from pymacaroons.macaroon import MACAROON_V2

    session = open_session(cli)
    m = Macaroon(
        location="timmy-tower",
        identifier="towerctl1 key=" + _key_id() + " nonce=" + "0" * 32,
        key=bytes.fromhex(ROOT_KEY_HEX),
        version=MACAROON_V2,
    )
    m.add_first_party_caveat(f"session = {session.id}")
    m.add_first_party_caveat("scope = read")
    m.add_first_party_caveat("expires = ٢٠٩٩-01-01T00:00:00Z")
    token = m.serialize().rstrip("=")
    done = cli("macaroon", "verify", token)
    assert done.exit_code == ExitCode.UNAUTHORIZED


def _key_id() -> str:
    from towerctl.auth.keys import key_id

    return key_id(bytes.fromhex(ROOT_KEY_HEX))


def test_a_padded_token_is_refused(cli: CLI) -> None:
    session = open_session(cli)
    padded = session.macaroon + "=" * (-len(session.macaroon) % 4 or 4)
    assert cli("macaroon", "verify", session.macaroon).exit_code == ExitCode.OK
    done = cli("macaroon", "verify", padded)
    assert done.exit_code == ExitCode.UNAUTHORIZED
    assert "padded" in done.stderr
