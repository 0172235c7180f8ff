"""Races between real processes on one session: one request in flight, money stays exact.

The request guard is a lease on the session row (towerctl.requests.lease). These tests
drive real `towerctl` processes with slow exec agents that record when they start
and end, on a direct connection and through a real PgBouncer in transaction mode,
and synchronise on observed events (an agent's start file, a waiter seen in
pg_stat_activity, a lease row), never on a guess at the machine's speed.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

import pgserver
from agents_fixtures import exec_agent
from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from conftest import direct as unpooled
from towerctl.config import Pricing
from towerctl.errors import ExitCode
from towerctl.requests.rules import cost_sats

PROCESSES = 4
REQUESTS_EACH = 3
TOWERCTL = [sys.executable, "-m", "towerctl"]


def spawn(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*TOWERCTL, *args],
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


def run(args: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOWERCTL, *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refused_as_busy(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`args` with no busy wait: refused at once, exit 5, "busy" on stderr."""
    refused = run(args, {**env, "TOWER_BUSY_WAIT": "0"})
    assert refused.returncode == ExitCode.NOT_SERVED, refused.stderr
    assert "busy" in refused.stderr, refused.stderr
    return refused


def wait_for(what: str, seen: Callable[[], bool], timeout: float = 60) -> None:
    """Until `seen()` (an observed event); the timeout only bounds a hung test."""
    deadline = time.monotonic() + timeout
    while not seen():
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.01)


def timed_agent(folder: Path, log: Path, seconds: float) -> str:
    """An exec agent that appends `S tag t` when it starts and `E tag t` when it ends
    (t: the system-wide monotonic clock), sleeping `seconds` between; it echoes."""
    return exec_agent(
        folder,
        f"timed_agent_{log.stem}.py",
        "import os, time, uuid\n"
        f"log, tag = {str(log)!r}, uuid.uuid4().hex\n"
        "with open(log, 'a') as f: f.write(f'S {tag} {time.monotonic()}\\n')\n"
        f"time.sleep({seconds!r})\n"
        "with open(log, 'a') as f: f.write(f'E {tag} {time.monotonic()}\\n')\n"
        "print(conv['messages'][-1]['content'])",
    )


def gate_agent(folder: Path, started: Path, gate: Path) -> str:
    """An exec agent that writes its pid to `started`, then waits (at most 60 s) until
    the file `gate` exists, and echoes."""
    return exec_agent(
        folder,
        f"gate_agent_{started.stem}.py",
        "import os, time\n"
        f"open({str(started)!r}, 'w').write(str(os.getpid()))\n"
        "deadline = time.monotonic() + 60\n"
        f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print(conv['messages'][-1]['content'])",
    )


def gated(s: OpenedSession, message: str, agent: str) -> list[str]:
    return ["session", "request", s.id, message, "--agent", agent, "--macaroon", s.macaroon]


def held_request(
    s: OpenedSession, message: str, env: dict[str, str], folder: Path
) -> tuple[subprocess.Popen[str], Path, Path]:
    """A request of `message` whose agent has started (its pid written) and now waits for
    the gate file: (the towerctl process, the agent's pid file, the gate)."""
    started, gate = folder / "started", folder / "gate"
    proc = spawn(gated(s, message, gate_agent(folder, started, gate)), env)
    wait_for("the agent start", lambda: started.exists() and started.read_text() != "")
    return proc, started, gate


def intervals(log: Path) -> list[tuple[float, float]]:
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in log.read_text().splitlines():
        mark, tag, t = line.split()
        (starts if mark == "S" else ends)[tag] = float(t)
    assert set(starts) == set(ends), "every agent that started ended"
    return sorted((starts[tag], ends[tag]) for tag in starts)


def lease(url: str, session_id: str) -> tuple[object, datetime | None, bool]:
    """(lease owner, lease end, whether it is live now) of a session."""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "SELECT lease_owner, lease_until, coalesce(lease_until > now(), false)"
            " FROM sessions WHERE id = %s",
            (session_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def store_counts(url: str, session_id: str) -> tuple[int, int, int]:
    """(requests, messages, debits) of one session."""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM session_requests WHERE session_id = %(s)s),"
            " (SELECT count(*) FROM session_messages WHERE session_id = %(s)s),"
            " (SELECT count(*) FROM balance_ledger WHERE kind = 'debit' AND session_id = %(s)s)",
            {"s": session_id},
        ).fetchone()
    assert row is not None
    return row


# --- the database: direct, or through a real PgBouncer in transaction mode --------------------


@pytest.fixture(scope="module")
def pooled_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL through PgBouncer, direct URL) of a database migrated by towerctl."""
    with (
        pgserver.pg_server() as server,
        pgserver.pgbouncer("127.0.0.1", server.port, pool_size=3) as bouncer,
    ):
        with server.connect() as admin:
            admin.execute("CREATE DATABASE races")
        home = tmp_path_factory.mktemp("pooled-home")
        env = {"TOWER_DATABASE_URL": bouncer.url("races"), "TOWER_HOME": str(home)}
        migrated = run(["migrate"], env)
        assert migrated.returncode == 0, migrated.stderr
        yield bouncer.url("races"), server.url("races")


@pytest.fixture(params=["direct", "pgbouncer"])
def race_env(
    request: pytest.FixtureRequest, db_url: str, tower_env: dict[str, str]
) -> tuple[dict[str, str], str]:
    """(environment for towerctl, direct URL for checks) on each kind of connection."""
    if request.param == "direct":
        # the checks' own connections bypass any pooler the whole run goes through
        return dict(tower_env), unpooled(db_url)
    through, direct = request.getfixturevalue("pooled_database")
    return {**tower_env, "TOWER_DATABASE_URL": through}, direct


def open_in(env: dict[str, str], deposit: int) -> OpenedSession:
    done = run(["session", "open", "--deposit", str(deposit), "--json"], env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    return OpenedSession(doc["sessionId"], doc["macaroon"])


# --- one request in flight, full price --------------------------------------------------------


@pytest.mark.timeout(300)
def test_concurrent_requests_never_overlap_and_pay_in_full(
    race_env: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    env, direct = race_env
    deposit = 80  # each request costs 11-14 sats: about six of the twelve can be paid
    s = open_in(env, deposit)
    log = tmp_path / "agent.log"
    agent = timed_agent(tmp_path, log, 0.2)
    procs = [
        spawn(
            ["session", "request", s.id, "--batch", "--agent", agent, "--macaroon", s.macaroon],
            env,
            "".join(json.dumps({"message": f"race {p}.{n}"}) + "\n" for n in range(REQUESTS_EACH)),
        )
        for p in range(PROCESSES)
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert "Traceback" not in err
        lines = [json.loads(line) for line in out.splitlines()]
        outcomes += lines
        worst = max([o["exitCode"] for o in lines], default=0)
        assert proc.returncode == worst, err
    assert len(outcomes) == PROCESSES * REQUESTS_EACH

    # The agents never ran at the same time: one request per session in flight.
    ran = intervals(log)
    assert ran, "some requests must have reached the agent"
    for (_, end), (start, _) in itertools.pairwise(ran):
        assert start >= end, f"two requests overlapped: one ended at {end}, one began at {start}"

    # Every complete request paid its full cost, except possibly the last one served,
    # which took what the balance had left.
    complete = sorted(
        (o for o in outcomes if o["state"] == "complete"), key=lambda o: o["requestId"]
    )
    assert len(complete) == len(ran)
    full = [cost_sats(Pricing(), o["inputTokens"], o["outputTokens"]) for o in complete]
    short = [i for i, o in enumerate(complete) if o["debitedSats"] != full[i]]
    assert short in ([], [len(complete) - 1]), (short, complete)
    if short:
        assert complete[-1]["debitedSats"] < full[-1] and complete[-1]["balanceRemaining"] == 0
    with psycopg.connect(direct, autocommit=True) as c:
        row = c.execute("SELECT balance_sats FROM sessions WHERE id = %s", (s.id,)).fetchone()
        recorded = c.execute("SELECT count(*) FROM session_requests").fetchone()
    assert row is not None
    assert sum(o["debitedSats"] for o in outcomes) == deposit - row[0]
    assert recorded == (sum(1 for o in outcomes if o["requestId"] is not None),)
    assert_store_consistent(direct)


# --- busy: refused at once, or waited for --------------------------------------------------------


@pytest.mark.timeout(180)
def test_busy_session_is_refused_at_once_or_waited_for(
    race_env: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    env, direct = race_env
    s = open_in(env, 10_000)
    holder, _started, gate = held_request(s, "held", env, tmp_path)
    owner, _until, live = lease(direct, s.id)
    assert owner is not None and live

    # TOWER_BUSY_WAIT=0: refused at once, exit 5 "busy", nothing written, JSON says so.
    refused = refused_as_busy(
        ["session", "request", s.id, "second", "--json", "--macaroon", s.macaroon], env
    )
    assert refused.stderr.count("\n") == 1
    doc = json.loads(refused.stdout)
    assert doc["requestId"] is None and doc["state"] == "rejected" and "busy" in doc["reason"]
    assert doc["exitCode"] == ExitCode.NOT_SERVED and doc["debitedSats"] == 0
    assert store_counts(direct, s.id) == (0, 0, 0)

    # With a busy wait: the second request waits for the lease, then runs.
    waiter = spawn(
        ["session", "request", s.id, "after", "--macaroon", s.macaroon],
        {**env, "TOWER_BUSY_WAIT": "60"},
    )
    with psycopg.connect(direct, autocommit=True) as c:
        wait_for(
            "the second request waiting for the lease",
            lambda: bool(
                c.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE query LIKE '%waiting for the session lease%'"
                    " AND pid <> pg_backend_pid()"
                ).fetchone()[0]  # type: ignore[index]
            ),
        )
    assert waiter.poll() is None, "still waiting while the first request holds the session"
    gate.touch()
    out, err = holder.communicate(timeout=60)
    assert holder.returncode == ExitCode.OK, err
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == ExitCode.OK, err
    assert out == "after\n"
    with psycopg.connect(direct, autocommit=True) as c:
        rows = c.execute(
            "SELECT m.content FROM session_requests r JOIN session_messages m"
            " ON m.session_id = r.session_id AND m.session_request_id = r.id AND m.role = 'user'"
            " WHERE r.session_id = %s ORDER BY r.id",
            (s.id,),
        ).fetchall()
    assert [r[0] for r in rows] == ["held", "after"]
    assert store_counts(direct, s.id) == (2, 4, 2)
    assert_store_consistent(direct)


# --- a killed process: the session serves again once its lease has run out -------------------


@pytest.mark.timeout(180)
def test_killed_request_blocks_the_session_only_until_its_lease_ends(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path
) -> None:
    s = open_session(cli, 10_000)
    env = {**tower_env, "TOWER_AGENT_TIMEOUT": "3"}  # lease: 3 s + the 5 s margin
    victim, started, _never = held_request(s, "killed", env, tmp_path)
    owner, until, live = lease(db_url, s.id)
    assert owner is not None and until is not None and live
    victim.kill()  # SIGKILL: no finally runs, the lease stays in the row
    victim.communicate(timeout=30)
    os.kill(int(started.read_text()), signal.SIGKILL)  # its agent too (own process group)

    refused_as_busy(["session", "request", s.id, "too early", "--macaroon", s.macaroon], env)
    assert lease(db_url, s.id)[2], "the killed request's lease is still live"

    served = run(
        ["session", "request", s.id, "after the lease", "--macaroon", s.macaroon],
        {**env, "TOWER_BUSY_WAIT": "60"},
    )
    assert served.returncode == ExitCode.OK, served.stderr
    with psycopg.connect(db_url, autocommit=True) as c:
        row = c.execute("SELECT created_at FROM session_requests").fetchall()
    assert len(row) == 1, "the killed request wrote nothing"
    took = row[0][0]
    assert took >= until, "served only after the lease ended"
    assert (took - until).total_seconds() < 3, "and right after it"
    assert lease(db_url, s.id)[0] is None, "released by the write"
    assert_store_consistent(db_url)


@pytest.mark.timeout(180)
def test_a_request_that_lost_its_lease_writes_nothing(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path
) -> None:
    """A request stalled past its lease (SIGSTOP) while another is served: when it wakes,
    its write finds the lease gone and records nothing (no second concurrent debit)."""
    s = open_session(cli, 10_000)
    env = {**tower_env, "TOWER_AGENT_TIMEOUT": "1"}  # lease: 1 s + the 5 s margin
    stalled, _started, gate = held_request(s, "stalled", env, tmp_path)
    stalled.send_signal(signal.SIGSTOP)
    try:
        gate.touch()
        other = run(
            ["session", "request", s.id, "meanwhile", "--macaroon", s.macaroon],
            {**env, "TOWER_BUSY_WAIT": "60"},
        )
        assert other.returncode == ExitCode.OK, other.stderr
    finally:
        stalled.send_signal(signal.SIGCONT)
    _out, err = stalled.communicate(timeout=60)
    assert stalled.returncode == ExitCode.NOT_SERVED, err
    assert err.count("\n") == 1 and "lease ran out" in err and "nothing was recorded" in err
    with psycopg.connect(db_url, autocommit=True) as c:
        contents = c.execute("SELECT content FROM session_messages ORDER BY id").fetchall()
    assert contents == [("meanwhile",), ("meanwhile",)]
    assert store_counts(db_url, s.id) == (1, 2, 1)
    assert_store_consistent(db_url)


# --- money under load, and clear-history between requests ---------------------------------------


def test_topups_racing_requests_keep_the_ledger_exact(
    cli: CLI, db_url: str, tower_env: dict[str, str]
) -> None:
    s = open_session(cli, 40)
    lines = "".join(json.dumps({"message": f"r{n}"}) + "\n" for n in range(10))
    procs = [
        spawn(["session", "request", s.id, "--batch", "--macaroon", s.macaroon], tower_env, lines)
        for _ in range(3)
    ]
    procs += [spawn(["session", "topup", s.id, "--sats", "25"], tower_env) for _ in range(4)]
    debited = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode in (ExitCode.OK, ExitCode.NOT_SERVED), err
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
        done = cli("session", "request", s.id, f"before {n}", "--macaroon", s.macaroon)
        assert done.exit_code == ExitCode.OK
    lines = "".join(json.dumps({"message": f"during {n}"}) + "\n" for n in range(5))
    procs = [
        spawn(["session", "request", s.id, "--batch", "--macaroon", s.macaroon], tower_env, lines),
        spawn(["session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon], tower_env),
        spawn(["session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon], tower_env),
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == ExitCode.OK, err
    with psycopg.connect(db_url) as c:
        clears = c.execute("SELECT count(*) FROM session_history_clears").fetchone()
        requests = c.execute("SELECT count(*) FROM session_requests").fetchone()
        half = c.execute(
            "SELECT session_request_id FROM session_messages GROUP BY 1 HAVING count(*) <> 2"
        ).fetchall()
    assert clears == (2,)
    assert requests == (10,)
    assert half == [], "a clear never splits a request's user and assistant messages"
    assert lease(db_url, s.id)[0] is None
    assert_store_consistent(db_url)


@pytest.mark.timeout(120)
def test_clear_history_waits_for_the_request_in_flight(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path
) -> None:
    s = open_session(cli, 10_000)
    holder, _started, gate = held_request(s, "held", tower_env, tmp_path)
    refused_as_busy(
        ["session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon], tower_env
    )
    gate.touch()
    assert holder.communicate(timeout=60)[0] == "held\n"
    done = run(["session", "clear-history", s.id, "--yes", "--macaroon", s.macaroon], tower_env)
    assert done.returncode == ExitCode.OK, done.stderr
    assert store_counts(db_url, s.id) == (1, 0, 1)
