"""`session purge --expired-for DURATION`: only histories of sessions expired long
enough go, in batches, recorded like clear-history; killed and re-run; next to live
traffic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from expired_histories import seed_expired as seed
from terminal import emulate, on_pty, read_pty, run_on_pty
from towerctl.errors import ExitCode

TOWERCTL = [sys.executable, "-m", "towerctl"]


def expire(conn: psycopg.Connection, sid: str, ago: str, *, state: str | None = None) -> None:
    conn.execute(
        "UPDATE sessions SET created_at = now() - %(ago)s::interval - interval '1 day',"
        " expires_at = now() - %(ago)s::interval, state = coalesce(%(state)s, state)"
        " WHERE id = %(sid)s",
        {"ago": ago, "sid": sid, "state": state},
    )


def message_counts(conn: psycopg.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT session_id::text, count(*) FROM session_messages GROUP BY 1")
    return {sid: int(n) for sid, n in rows.fetchall()}


def totals(conn: psycopg.Connection) -> tuple[int, int]:
    row = conn.execute(
        "SELECT (SELECT count(*) FROM session_requests), (SELECT count(*) FROM balance_ledger)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def chat(cli: CLI, n: int = 2) -> OpenedSession:
    s = open_session(cli, 1_000_000)
    for k in range(n):
        result = cli("session", "request", s.id, f"hello {k}", "--macaroon", s.macaroon)
        assert result.exit_code == ExitCode.OK
    return s


def test_only_histories_expired_long_enough_go(
    cli: CLI, conn: psycopg.Connection, db_url: str
) -> None:
    active, paused, old, recent, old_active = (chat(cli) for _ in range(5))
    conn.execute("UPDATE sessions SET state = 'paused' WHERE id = %s", (paused.id,))
    expire(conn, old.id, "10 days", state="expired")
    expire(conn, recent.id, "1 hour", state="expired")
    expire(conn, old_active.id, "8 days")  # past expiry, never recorded as expired
    before = message_counts(conn)
    kept_totals = totals(conn)

    dry = cli("session", "purge", "--expired-for", "7d", "--dry-run", "--json")
    assert dry.exit_code == ExitCode.OK, dry.stderr
    assert json.loads(dry.stdout) == {"sessions": 2, "messages": 8, "dryRun": True}
    assert message_counts(conn) == before

    done = cli("session", "purge", "--expired-for", "7d", "--yes", "--json")
    assert done.exit_code == ExitCode.OK, done.stderr
    assert json.loads(done.stdout) == {"sessions": 2, "messages": 8, "dryRun": False}
    after = message_counts(conn)
    assert set(after) == {active.id, paused.id, recent.id}
    assert all(after[s] == before[s] for s in after)
    assert totals(conn) == kept_totals  # requests and ledger stay
    records = conn.execute(
        "SELECT session_id::text, macaroon_identifier, messages_deleted, last_request_id"
        " FROM session_history_clears ORDER BY 1"
    ).fetchall()
    last = {
        sid: rid
        for sid, rid in conn.execute(
            "SELECT session_id::text, max(id) FROM session_requests GROUP BY 1"
        ).fetchall()
    }
    assert sorted(records) == sorted(
        (sid, "purge", 4, last[sid]) for sid in (old.id, old_active.id)
    )
    assert_store_consistent(db_url)
    doctor = cli("doctor")
    assert doctor.exit_code == ExitCode.OK, doctor.stdout
    again = cli("session", "purge", "--expired-for", "7d", "--yes", "--json")
    assert json.loads(again.stdout) == {"sessions": 0, "messages": 0, "dryRun": False}
    text = cli("session", "purge", "--expired-for", "1m", "--yes")
    assert text.exit_code == ExitCode.OK
    assert text.stderr == "deleted 4 messages of 1 session\n"


def test_doctor_tells_a_purged_history_from_a_lost_message(
    cli: CLI, conn: psycopg.Connection
) -> None:
    purged, live = chat(cli), chat(cli)
    expire(conn, purged.id, "2 days", state="expired")
    assert cli("session", "purge", "--expired-for", "1d", "--yes").exit_code == ExitCode.OK
    assert cli("doctor").exit_code == ExitCode.OK
    conn.execute(
        "DELETE FROM session_messages WHERE session_id = %s AND role = 'user'"
        " AND id = (SELECT min(id) FROM session_messages WHERE session_id = %s)",
        (live.id, live.id),
    )
    # A deleted row leaves no trace for the incremental run: --full reads every session.
    report = cli("doctor", "--full", "--json")
    assert report.exit_code == ExitCode.INCONSISTENT
    failed = {c["name"]: c["detail"] for c in json.loads(report.stdout)["checks"] if not c["ok"]}
    assert list(failed) == ["requests_have_user_messages"]
    assert live.id in failed["requests_have_user_messages"]
    assert purged.id not in failed["requests_have_user_messages"]


def test_a_purge_record_of_a_live_session_is_an_inconsistency(
    cli: CLI, conn: psycopg.Connection
) -> None:
    live = chat(cli)
    conn.execute(
        "INSERT INTO session_history_clears (session_id, macaroon_identifier) VALUES (%s, 'purge')",
        (live.id,),
    )
    report = cli("doctor", "--json")
    assert report.exit_code == ExitCode.INCONSISTENT
    failed = [c["name"] for c in json.loads(report.stdout)["checks"] if not c["ok"]]
    assert failed == ["purges_only_expired_sessions"]


def test_refuses_without_yes_when_not_on_a_terminal(cli: CLI, conn: psycopg.Connection) -> None:
    old = chat(cli)
    expire(conn, old.id, "2 days", state="expired")
    result = cli("session", "purge", "--expired-for", "1d")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "--yes" in result.stderr
    assert message_counts(conn)[old.id] == 4


@pytest.mark.parametrize("value", ["", "7", "-1d", "1y", "400d"])
def test_bad_duration_is_a_usage_error(cli: CLI, value: str) -> None:
    result = cli("session", "purge", "--expired-for", value, "--yes")
    assert result.exit_code == ExitCode.BAD_INPUT


def test_needs_expired_for(cli: CLI) -> None:
    assert cli("session", "purge", "--yes").exit_code == ExitCode.BAD_INPUT


@pytest.mark.timeout(180)
def test_killed_mid_way_then_rerun_completes(
    conn: psycopg.Connection, db_url: str, tower_env: dict[str, str]
) -> None:
    seed(conn, sessions=4, requests=60_000)  # 480,000 messages, batches of 5,000
    total = sum(message_counts(conn).values())
    purge = subprocess.Popen(
        [*TOWERCTL, "session", "purge", "--expired-for", "7d", "--yes"],
        env=os.environ | tower_env, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = sum(message_counts(conn).values())
            if left < total - 20_000:
                break
            time.sleep(0.05)
        assert purge.poll() is None, "the purge ended before it could be killed"
        purge.send_signal(signal.SIGKILL)
        purge.wait(10)
    finally:
        if purge.poll() is None:
            purge.kill()
    # The server finishes (and commits) the batch in flight on its own: wait for it.
    gone = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
    gone += " AND application_name = 'towerctl' AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + 30
    while conn.execute(gone).fetchone() != (0,) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sum(message_counts(conn).values())
    assert 0 < left < total  # part of it went, batch by batch
    assert_store_consistent(db_url)  # the record of each batch came with it
    result = subprocess.run(
        [*TOWERCTL, "session", "purge", "--expired-for", "7d", "--yes", "--json"],
        env=os.environ | tower_env, capture_output=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["messages"] == left
    assert message_counts(conn) == {}
    assert_store_consistent(db_url)
    # One record per session, carried on across the kill: it counts every message.
    row = conn.execute(
        "SELECT count(*), count(DISTINCT session_id), sum(messages_deleted)"
        " FROM session_history_clears WHERE macaroon_identifier = 'purge'"
    ).fetchone()
    assert row == (4, 4, total)


@pytest.mark.timeout(180)
def test_purge_next_to_a_live_batch_slows_no_request(
    cli: CLI, conn: psycopg.Connection, db_url: str, tower_env: dict[str, str]
) -> None:
    seed(conn, sessions=20, requests=10_000)  # 400,000 messages to purge
    live = open_session(cli, 10_000_000)
    busy_wait = 2.0
    env = os.environ | tower_env | {"TOWER_BUSY_WAIT": str(busy_wait)}
    batch = subprocess.Popen(
        [*TOWERCTL, "session", "request", live.id, "--batch", "--macaroon", live.macaroon],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert batch.stdin is not None and batch.stdout is not None

    def ask(n: int) -> tuple[dict[str, object], float]:
        assert batch.stdin is not None and batch.stdout is not None
        started = time.monotonic()
        batch.stdin.write((json.dumps({"message": f"live {n}"}) + "\n").encode())
        batch.stdin.flush()
        return json.loads(batch.stdout.readline()), time.monotonic() - started

    lines = [ask(0)[0]]  # the batch runs before the purge starts, and until it has ended
    purge = subprocess.Popen(
        [*TOWERCTL, "session", "purge", "--expired-for", "7d", "--yes", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        gaps: list[float] = []
        deadline = time.monotonic() + 120
        while purge.poll() is None and time.monotonic() < deadline:
            line, gap = ask(len(lines))
            lines.append(line)
            gaps.append(gap)
        batch.stdin.close()
        assert batch.wait(30) == ExitCode.OK
        out, err = purge.communicate(timeout=120)
        assert purge.returncode == ExitCode.OK, err
    finally:
        for p in (purge, batch):
            if p.poll() is None:
                p.kill()
    assert len(gaps) >= 10, f"only {len(gaps)} requests ran while the purge ran"
    assert [line["state"] for line in lines] == ["complete"] * len(lines)
    assert max(gaps) < busy_wait, gaps
    assert json.loads(out) == {"sessions": 20, "messages": 400_000, "dryRun": False}
    assert message_counts(conn) == {live.id: 2 * len(lines)}
    assert_store_consistent(db_url)


@pytest.mark.timeout(60)
def test_on_a_terminal_it_asks_and_shows_progress(
    conn: psycopg.Connection, tower_env: dict[str, str]
) -> None:
    seed(conn, sessions=2, requests=10)
    env = {k: v for k, v in (os.environ | tower_env).items() if k != "NO_COLOR"}
    screen = run_on_pty(["session", "purge", "--expired-for", "7d"], env=env, stdin_text="y\n")
    assert screen.exit_code == ExitCode.OK, screen.text
    assert "Delete 40 messages of 2 sessions expired for at least 7d?" in screen.text
    assert "purging" in screen.text
    assert "deleted 40 messages of 2 sessions" in screen.text
    assert message_counts(conn) == {}


@pytest.mark.timeout(60)
def test_the_prompt_stays_on_the_screen_answered(
    conn: psycopg.Connection, tower_env: dict[str, str]
) -> None:
    """Answered as a person does (after reading the question): the screen keeps the
    question with its answer, then the outcome; the progress bar leaves no trace."""
    seed(conn, sessions=2, requests=10)
    env = {k: v for k, v in (os.environ | tower_env).items() if k != "NO_COLOR"}
    with on_pty(
        ["session", "purge", "--expired-for", "7d"],
        {**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
    ) as (proc, master):
        # The prompt's last space is written on its own, after the rest: wait for it.
        data = read_pty(master, 30, until=lambda seen: b"[y/N]: " in seen)
        os.write(master, b"y\n")
        data += read_pty(master, 30, proc=proc)
        assert proc.wait(timeout=30) == ExitCode.OK
    shown = emulate(data, 120)
    prompt = shown.row_with("Delete 40 messages")
    assert prompt.strip().endswith("[y/N]: y"), shown.text
    assert shown.row_with("deleted 40 messages of 2 sessions")
    assert "purging" not in shown.text  # transient: gone once done


@pytest.mark.timeout(60)
def test_nothing_to_delete_asks_nothing(tower_env: dict[str, str]) -> None:
    env = {k: v for k, v in (os.environ | tower_env).items() if k != "NO_COLOR"}
    screen = run_on_pty(["session", "purge", "--expired-for", "7d"], env=env)
    assert screen.exit_code == ExitCode.OK, screen.text
    assert "Delete" not in screen.text and "[y/N]" not in screen.text
    assert "deleted 0 messages of 0 sessions" in screen.text
