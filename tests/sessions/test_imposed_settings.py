"""Settings a server, a role, a database or the environment imposes on towerctl's session.

An operator meets them as `ALTER DATABASE … SET`, `ALTER ROLE … SET` (here scoped to the
test's own database: `ALTER ROLE … IN DATABASE`), `PGOPTIONS` and libpq's `PG*`
variables. Under each, the main commands give the same results as without it: every
connection pins client encoding, date and interval style, time zone and the timeouts.
"""

from __future__ import annotations

import json
import re

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from conftest import CLI, THROUGH_PGBOUNCER, direct, open_session
from towerctl import db
from towerctl.errors import ExitCode

MESSAGE = "héllo ☃ 日本 — naïve"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")

# (name, value): each one broke at least one command before connections pinned it.
HOSTILE = [
    ("client_encoding", "LATIN1"),
    ("client_encoding", "SQL_ASCII"),
    ("DateStyle", "SQL, DMY"),
    ("DateStyle", "German"),
    ("IntervalStyle", "iso_8601"),
    ("IntervalStyle", "sql_standard"),
    ("TimeZone", "Asia/Kathmandu"),
    ("statement_timeout", "1"),
    ("idle_in_transaction_session_timeout", "1"),
    ("transaction_timeout", "1"),
]
WAYS = ["alter_database", "alter_role_in_database", "pgoptions"]


def _apply(way: str, name: str, value: str, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "transaction_timeout":
        with psycopg.connect(direct(db_url), autocommit=True) as admin:
            if admin.info.server_version < 170000:  # PGOPTIONS naming it refuses the login
                pytest.skip("transaction_timeout is PostgreSQL 17's")
    if way == "pgoptions":
        monkeypatch.setenv("PGOPTIONS", f"-c {name}={value.replace(' ', '')}")
        return
    dbname = conninfo_to_dict(db_url)["dbname"]
    target = (
        sql.SQL("DATABASE {}").format(sql.Identifier(dbname))
        if way == "alter_database"
        else sql.SQL("ROLE CURRENT_USER IN DATABASE {}").format(sql.Identifier(dbname))
    )
    with psycopg.connect(direct(db_url), autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER {} SET {} = {}").format(target, sql.Identifier(name), sql.Literal(value))
        )


def _ok(cli: CLI, *args: str, input: str | None = None) -> dict:
    result = cli(*args, input=input)
    assert result.exit_code == 0, (args, result.stderr)
    return json.loads(result.stdout) if result.stdout.strip() else {}


def _main_commands(cli: CLI) -> None:
    """migrate, migrate status, session open/show/list/request/messages, doctor: as usual."""
    assert cli("migrate").exit_code == 0
    status = _ok(cli, "migrate", "status", "--json")
    assert status["upToDate"] is True
    assert {m["state"] for m in status["migrations"]} == {"applied"}
    opened = open_session(cli, 500)
    shown = _ok(cli, "session", "show", opened.id, "--json")
    assert shown["balanceSats"] == 500 and ISO_UTC.match(shown["createdAt"]), shown
    listed = _ok(cli, "session", "list", "--json")
    assert [s["sessionId"] for s in listed["sessions"]] == [opened.id]
    assert ISO_UTC.match(listed["sessions"][0]["expiresAt"]), listed
    outcome = _ok(cli, "session", "request", opened.id, MESSAGE, "--json",
                  "--macaroon", opened.macaroon)  # fmt: skip
    assert outcome["state"] == "complete", outcome
    transcript = _ok(cli, "session", "messages", opened.id, "--format", "json",
                     "--macaroon", opened.macaroon)  # fmt: skip
    assert transcript["messages"][0]["content"] == MESSAGE
    assert all(ISO_UTC.match(m["createdAt"]) for m in transcript["messages"]), transcript
    doctor = _ok(cli, "doctor", "--json")
    assert doctor["ok"] is True, doctor


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("name", "value"), HOSTILE, ids=[f"{n}={v}" for n, v in HOSTILE])
def test_the_main_commands_under_an_imposed_setting(
    way: str, name: str, value: str, cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if way == "pgoptions" and THROUGH_PGBOUNCER:
        pytest.skip("a PgBouncer refuses the startup options PGOPTIONS sends")
    _apply(way, name, value, db_url, monkeypatch)
    _main_commands(cli)


def test_the_main_commands_under_libpq_environment_variables(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGCLIENTENCODING", "LATIN1")
    monkeypatch.setenv("PGDATESTYLE", "German")
    monkeypatch.setenv("PGTZ", "America/St_Johns")
    _main_commands(cli)


def test_a_connection_turns_the_timeouts_off(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement longer than the role's timeouts runs (on a direct connection)."""
    if THROUGH_PGBOUNCER:
        pytest.skip("behind a pooler the timeouts cannot be kept per client")
    monkeypatch.setenv(
        "PGOPTIONS", "-c statement_timeout=20 -c idle_in_transaction_session_timeout=20"
    )
    with db.connect(db_url) as conn, conn.transaction():
        conn.execute("SELECT pg_sleep(0.1)")
        conn.execute("SELECT 1")


def test_a_cancelled_doctor_check_is_not_run_not_an_inconsistency(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from towerctl import doctor

    name, summary, _ = doctor.CHECKS[0]
    cancelled = (name, summary, "SELECT pg_cancel_backend(pg_backend_pid()), pg_sleep(1)")
    monkeypatch.setattr(doctor, "CHECKS", (cancelled, *doctor.CHECKS[1:]))
    result = cli("doctor", "--json")
    assert result.exit_code == ExitCode.UNREACHABLE, result.stderr
    report = json.loads(result.stdout)
    [check] = [c for c in report["checks"] if c["name"] == name]
    assert check["ran"] is False and check["detail"].startswith("not run: ")
    assert all(c["ok"] for c in report["checks"] if c["name"] != name)
    assert "could not run" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_cancelled_statement_is_one_line_and_exit_8(cli: CLI, db_url: str) -> None:
    error = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    classified = db.classify(error)
    assert classified is not None and classified.exit_code == ExitCode.UNREACHABLE
    assert "cancelled" in str(classified)
