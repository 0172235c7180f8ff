"""Races between real processes on one session: money stays exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg

from conftest import CLI, assert_store_consistent, open_session

PROCESSES = 6
REQUESTS_EACH = 5


def spawn(args: list[str], env: dict[str, str], stdin: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "towerctl", *args],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    proc.stdin = None  # fed already; communicate() only collects the output
    return proc


def test_many_processes_on_a_session_that_can_pay_for_a_few(
    cli: CLI, db_url: str, tower_env: dict[str, str]
) -> None:
    s = open_session(cli, 60)  # each request costs 12-14 sats: a handful can be paid
    lines = "".join(json.dumps({"message": f"race {n}"}) + "\n" for n in range(REQUESTS_EACH))
    procs = [
        spawn(["session", "request", s.id, "--batch", "--macaroon", s.macaroon], tower_env, lines)
        for _ in range(PROCESSES)
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 5), err
        assert "Traceback" not in err
        outcomes += [json.loads(line) for line in out.splitlines()]
    assert len(outcomes) == PROCESSES * REQUESTS_EACH
    recorded = [o for o in outcomes if o["requestId"] is not None]
    complete = [o for o in recorded if o["state"] == "complete"]
    assert complete, "some requests must have been served"
    assert all(o["debitedSats"] > 0 for o in complete), "no free work"
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT balance_sats FROM sessions WHERE id = %s", (s.id,)).fetchone()
        assert row is not None
        final = row[0]
        orphans = c.execute(
            "SELECT count(*) FROM session_requests r WHERE NOT EXISTS (SELECT 1 FROM"
            " session_messages m WHERE m.session_id = r.session_id"
            " AND m.session_request_id = r.id AND m.role = 'user')"
        ).fetchone()
        rows = c.execute("SELECT count(*) FROM session_requests").fetchone()
    assert final >= 0
    assert sum(o["debitedSats"] for o in outcomes) == 60 - final
    assert orphans == (0,)
    assert rows == (len(recorded),)
    assert_store_consistent(db_url)


def test_topups_racing_requests_keep_the_ledger_exact(
    cli: CLI, db_url: str, tower_env: dict[str, str]
) -> None:
    s = open_session(cli, 40)
    lines = "".join(json.dumps({"message": f"r{n}"}) + "\n" for n in range(10))
    procs = [
        spawn(["session", "request", s.id, "--batch", "--macaroon", s.macaroon], tower_env, lines)
        for _ in range(3)
    ]
    procs += [spawn(["session", "topup", s.id, "--sats", "25"], tower_env, "") for _ in range(4)]
    debited = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 5), err
        if out.startswith("{"):
            debited += sum(json.loads(line)["debitedSats"] for line in out.splitlines())
    with psycopg.connect(db_url) as c:
        row = c.execute("SELECT balance_sats FROM sessions WHERE id = %s", (s.id,)).fetchone()
    assert row == (40 + 4 * 25 - debited,)
    assert_store_consistent(db_url)


def test_two_clear_histories_and_a_request_at_once(
    cli: CLI, db_url: str, tower_env: dict[str, str]
) -> None:
    s = open_session(cli, 10_000)
    for n in range(5):
        assert (
            cli("session", "request", s.id, f"before {n}", "--macaroon", s.macaroon).exit_code == 0
        )
    lines = "".join(json.dumps({"message": f"during {n}"}) + "\n" for n in range(5))
    procs = [
        spawn(["session", "request", s.id, "--batch", "--macaroon", s.macaroon], tower_env, lines),
        spawn(["session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon], tower_env, ""),
        spawn(["session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon], tower_env, ""),
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    with psycopg.connect(db_url) as c:
        clears = c.execute("SELECT count(*) FROM session_history_clears").fetchone()
        requests = c.execute("SELECT count(*) FROM session_requests").fetchone()
        half = c.execute(
            "SELECT session_request_id FROM session_messages GROUP BY 1 HAVING count(*) <> 2"
        ).fetchall()
    assert clears == (2,)
    assert requests == (10,)
    assert half == [], "a clear never splits a request's user and assistant messages"
    assert_store_consistent(db_url)
