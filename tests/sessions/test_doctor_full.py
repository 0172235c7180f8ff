"""`doctor --full` finds a request's message faults with one pass over the messages index
and the requests' primary key, then runs each check over the sessions that pass names:
it reports what the checks report over every session, and a pass that could not run
leaves its checks not run (exit 8)."""

from __future__ import annotations

import json

import psycopg
import pytest

from conftest import CLI, OpenedSession, open_session
from towerctl import doctor
from towerctl.errors import ExitCode


def chat(cli: CLI) -> OpenedSession:
    s = open_session(cli, 1_000_000)
    for k in range(2):
        result = cli("session", "request", s.id, f"hello {k}", "--macaroon", s.macaroon)
        assert result.exit_code == ExitCode.OK, result.stderr
    return s


def failed(checks: list[doctor.Check]) -> dict[str, str]:
    return {c.name: c.detail for c in checks if not c.ok}


# Each plants one fault in the session's last request.
FAULTS = {
    "lost user message": (
        "DELETE FROM session_messages WHERE session_id = %(s)s AND role = 'user'"
        " AND session_request_id = (SELECT max(id) FROM session_requests"
        " WHERE session_id = %(s)s)",
        {"requests_have_user_messages"},
    ),
    "second assistant message": (
        "INSERT INTO session_messages (session_id, role, content, session_request_id,"
        " token_count) SELECT session_id, role, content, session_request_id, token_count"
        " FROM session_messages WHERE session_id = %(s)s AND role = 'assistant'"
        " ORDER BY id DESC LIMIT 1",
        {"message_roles_per_request"},
    ),
    "message of no request": (
        "ALTER TABLE session_messages DROP CONSTRAINT session_messages_request_fkey;"
        " UPDATE session_messages SET session_request_id = 999999"
        " WHERE id = (SELECT max(id) FROM session_messages WHERE session_id = %(s)s)",
        {"messages_have_requests"},
    ),
    "debit of no request": (
        "ALTER TABLE balance_ledger DROP CONSTRAINT balance_ledger_request_fkey;"
        " INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)"
        " VALUES (%(s)s, 'debit', 3, 999999);"
        " UPDATE sessions SET balance_sats = balance_sats - 3 WHERE id = %(s)s",
        {"debits_match_requests"},
    ),
    "debit of another amount": (
        "UPDATE session_requests SET cost_sats = cost_sats + 1, debited_sats = debited_sats + 1"
        " WHERE session_id = %(s)s AND id = (SELECT max(id) FROM session_requests"
        " WHERE session_id = %(s)s)",
        {"debits_match_requests"},
    ),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_full_run_reports_what_the_checks_report_over_every_session(
    cli: CLI, conn: psycopg.Connection, fault: str
) -> None:
    kept, broken = chat(cli), chat(cli)
    sql, expected = FAULTS[fault]
    for statement in sql.split(";"):
        conn.execute(statement, {"s": broken.id})  # type: ignore[arg-type]
    every = [str(row[0]) for row in conn.execute("SELECT id FROM sessions")]
    with conn.transaction():
        full = failed(doctor.run_checks(conn))
    with conn.transaction():
        scoped = failed(doctor.run_checks(conn, sessions=every))
    assert set(full) == expected and full == scoped
    assert all(broken.id in detail and kept.id not in detail for detail in full.values())


def test_a_cleared_history_is_no_suspect_of_a_full_run(cli: CLI) -> None:
    s = chat(cli)
    cleared = cli("session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon)
    assert cleared.exit_code == ExitCode.OK, cleared.stderr
    result = cli("doctor", "--full", "--json")
    assert result.exit_code == ExitCode.OK, result.stdout


def test_a_cancelled_pass_leaves_its_checks_not_run_exit_8(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat(cli)
    cancelled = "SELECT pg_cancel_backend(pg_backend_pid()), pg_sleep(1)"
    monkeypatch.setattr(doctor, "SUSPECTS", cancelled)
    result = cli("doctor", "--full", "--json")
    assert result.exit_code == ExitCode.UNREACHABLE, result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    for name in doctor.SUSPECTED:
        assert checks[name]["ran"] is False and checks[name]["detail"].startswith("not run: ")
    assert all(c["ok"] for c in checks.values() if c["name"] not in doctor.SUSPECTED)
