"""`doctor` checks what changed since its last clean run; `--full` checks everything
(SPEC 16). The watermarks stay right when a lower id commits after a higher one and
when purges delete messages; a check that could not run is exit 8."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from conftest import CLI, OpenedSession, open_session
from towerctl import doctor, watermarks
from towerctl.errors import ExitCode


@pytest.fixture(autouse=True)
def short_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transaction left open by a test holds the watermarks back quickly."""
    monkeypatch.setattr(watermarks, "WAIT_SECONDS", 0.3)


def chat(cli: CLI, n: int = 2) -> OpenedSession:
    s = open_session(cli, 1_000_000)
    for k in range(n):
        result = cli("session", "request", s.id, f"hello {k}", "--macaroon", s.macaroon)
        assert result.exit_code == ExitCode.OK, result.stderr
    return s


def run_doctor(cli: CLI, *flags: str) -> tuple[int, dict]:
    result = cli("doctor", "--json", *flags)
    return result.exit_code, json.loads(result.stdout)


def failed(report: dict) -> dict[str, str]:
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def plant_topup(conn: psycopg.Connection, sid: str) -> None:
    """A ledger row the balance does not show: balance_matches_ledger fails."""
    conn.execute(
        "INSERT INTO balance_ledger (session_id, kind, amount_sats) VALUES (%s, 'topup', 7)",
        (sid,),
    )


def test_a_clean_run_records_watermarks_and_the_next_checks_only_new_sessions(
    cli: CLI, conn: psycopg.Connection
) -> None:
    chat(cli)
    code, first = run_doctor(cli)
    assert code == ExitCode.OK
    assert first["full"] is True and first["watermarksRecorded"] is True  # none before
    newer = chat(cli)
    code, second = run_doctor(cli)
    assert code == ExitCode.OK and second["full"] is False
    assert second["sessionsChecked"] == 1
    stored = conn.execute("SELECT count(*) FROM doctor_watermarks").fetchone()
    assert stored is not None and stored[0] == len(watermarks.ID_SOURCES) + 1
    text = cli("doctor")
    assert text.stdout.splitlines()[-1].startswith("checked 0 session(s) changed")
    assert newer.id not in text.stdout


def test_an_inconsistency_in_new_rows_is_found_by_the_default_run(
    cli: CLI, conn: psycopg.Connection
) -> None:
    chat(cli)
    assert run_doctor(cli)[0] == ExitCode.OK
    newer = chat(cli)
    plant_topup(conn, newer.id)
    code, report = run_doctor(cli)
    assert code == ExitCode.INCONSISTENT
    assert list(failed(report)) == ["balance_matches_ledger"]
    assert newer.id in failed(report)["balance_matches_ledger"]
    assert report["sessionsChecked"] == 1 and report["watermarksRecorded"] is False
    # The watermarks did not move: the next default run finds it again.
    assert run_doctor(cli)[0] == ExitCode.INCONSISTENT


def test_a_new_session_with_no_other_row_is_checked(cli: CLI, conn: psycopg.Connection) -> None:
    chat(cli)
    assert run_doctor(cli)[0] == ExitCode.OK
    row = conn.execute(
        "INSERT INTO sessions (state, balance_sats) VALUES ('active', 500) RETURNING id::text"
    ).fetchone()
    assert row is not None
    code, report = run_doctor(cli)
    assert code == ExitCode.INCONSISTENT
    assert row[0] in failed(report)["balance_matches_ledger"]


def test_a_duplicate_message_added_to_an_old_request_is_found(
    cli: CLI, conn: psycopg.Connection
) -> None:
    old = chat(cli)
    assert run_doctor(cli)[0] == ExitCode.OK
    conn.execute(
        "INSERT INTO session_messages (session_id, role, content, session_request_id,"
        " token_count) SELECT session_id, role, content, session_request_id, token_count"
        " FROM session_messages WHERE session_id = %s AND role = 'user' ORDER BY id LIMIT 1",
        (old.id,),
    )
    code, report = run_doctor(cli)
    assert code == ExitCode.INCONSISTENT
    assert list(failed(report)) == ["message_roles_per_request"]


def test_an_inconsistency_in_old_rows_is_found_by_full_only(
    cli: CLI, conn: psycopg.Connection
) -> None:
    old = chat(cli)
    assert run_doctor(cli)[0] == ExitCode.OK
    conn.execute("UPDATE sessions SET balance_sats = balance_sats + 1 WHERE id = %s", (old.id,))
    code, report = run_doctor(cli)
    assert code == ExitCode.OK and report["sessionsChecked"] == 0
    code, report = run_doctor(cli, "--full")
    assert code == ExitCode.INCONSISTENT and report["full"] is True
    assert old.id in failed(report)["balance_matches_ledger"]


def test_a_low_id_committed_after_a_run_is_checked_by_the_next(
    cli: CLI, conn: psycopg.Connection, db_url: str
) -> None:
    early, late = chat(cli), chat(cli)
    assert run_doctor(cli)[0] == ExitCode.OK
    with psycopg.connect(db_url) as slow:  # takes a ledger id, commits after the run
        plant_topup(slow, early.id)
        plant_topup(conn, late.id)  # a higher id, committed first
        conn.execute(
            "UPDATE sessions SET balance_sats = balance_sats + 7 WHERE id = %s", (late.id,)
        )
        code, report = run_doctor(cli)
        assert code == ExitCode.OK  # the open transaction's row is not visible yet
        assert report["watermarksRecorded"] is False
        slow.commit()
    code, report = run_doctor(cli)
    assert code == ExitCode.INCONSISTENT
    assert early.id in failed(report)["balance_matches_ledger"]


def test_a_purge_is_no_inconsistency_and_skips_nothing(cli: CLI, conn: psycopg.Connection) -> None:
    kept, gone = chat(cli), chat(cli)  # the purged session holds the highest ids
    assert run_doctor(cli)[0] == ExitCode.OK
    conn.execute(
        "UPDATE sessions SET created_at = now() - interval '3 days',"
        " expires_at = now() - interval '2 days', state = 'expired' WHERE id = %s",
        (gone.id,),
    )
    purged = cli("session", "purge", "--expired-for", "1d", "--yes", "--json")
    assert purged.exit_code == ExitCode.OK and json.loads(purged.stdout)["messages"] == 4
    code, report = run_doctor(cli)
    assert code == ExitCode.OK, failed(report)
    assert report["sessionsChecked"] >= 1
    newer = chat(cli, 1)
    plant_topup(conn, newer.id)
    code, report = run_doctor(cli)
    assert code == ExitCode.INCONSISTENT
    assert kept.id not in json.dumps(report) and newer.id in json.dumps(report)


def test_a_check_cancelled_from_another_connection_is_not_run_exit_8(
    cli: CLI, conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat(cli)
    assert run_doctor(cli)[0] == ExitCode.OK
    newer = chat(cli)
    plant_topup(conn, newer.id)
    slow = ("slow_check", "waits to be cancelled", "SELECT pg_sleep(30), {scope[NULL::uuid]}")
    monkeypatch.setattr(doctor, "CHECKS", (*doctor.CHECKS, slow))

    def cancel() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'SELECT pg_sleep(30)%%' AND pid <> pg_backend_pid()"
            ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel)
    canceller.start()
    result = cli("doctor", "--json")
    canceller.join()
    report = json.loads(result.stdout)
    [check] = [c for c in report["checks"] if c["name"] == "slow_check"]
    assert check["ran"] is False and check["detail"].startswith("not run: ")
    # The planted fault is still reported (exit 9 wins); without it, exit 8.
    assert result.exit_code == ExitCode.INCONSISTENT
    assert report["watermarksRecorded"] is False
    conn.execute("DELETE FROM balance_ledger WHERE kind = 'topup' AND session_id = %s", (newer.id,))
    canceller = threading.Thread(target=cancel)
    canceller.start()
    result = cli("doctor", "--json")
    canceller.join()
    assert result.exit_code == ExitCode.UNREACHABLE
    assert all(c["ok"] for c in json.loads(result.stdout)["checks"] if c["ran"])
    assert "could not run" in result.stderr
