"""A signal mid-batch or mid-request: every signal whose default action ends the
process ends towerctl as Ctrl-C does. The lines answered stay answered, the line whose
agent was running is not recorded, the agent's processes end, the session's lease is
given back and no transaction is left open; exit 128 + the signal's number."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

import faults
from agents_fixtures import exec_agent, pid_alive
from conftest import CLI, OpenedSession, open_session
from towerctl.cli.output import TERMINATING_SIGNALS
from towerctl.errors import ExitCode

# SIGINT (Ctrl-C) and each signal whose default action ends the process, the real-time
# ones at their ends only.
SIGNALS = sorted(
    {signal.SIGINT, *TERMINATING_SIGNALS} - set(range(signal.SIGRTMIN + 1, signal.SIGRTMAX))
)

# An agent that answers at once, except a message "slow": then it writes its pid where
# the test looks and sleeps past the test's own timeout.
# (An agent's environment is towerctl's own short list: the path is written in.)
AGENT_BODY = """
import os, time
text = conv["messages"][-1]["content"]
if text == "slow":
    open({pid_file!r} + ".tmp", "w").write(str(os.getpid()))
    os.rename({pid_file!r} + ".tmp", {pid_file!r})
    time.sleep(120)
print("ok " + text)
"""


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate(timeout=5)
        assert time.monotonic() < deadline, "the slow agent never started"
        time.sleep(0.02)
    return int(path.read_text())


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _towerctl_connections(db_url: str) -> int:
    """towerctl's connections to this database still open (a closed one may take a moment
    to leave pg_stat_activity)."""
    deadline = time.monotonic() + 10
    with psycopg.connect(db_url, autocommit=True) as c:
        while True:
            row = c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'towerctl'"
            ).fetchone()
            assert row is not None
            if row[0] == 0 or time.monotonic() > deadline:
                return int(row[0])
            time.sleep(0.05)


def _recorded(db_url: str, s: OpenedSession) -> list[str]:
    with psycopg.connect(db_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT m.content FROM session_messages m WHERE m.session_id = %s"
            " AND m.role = 'user' ORDER BY m.id",
            (s.id,),
        ).fetchall()
    return [r[0] for r in rows]


def _run_until_slow(
    s: OpenedSession, spec: str, argv: list[str], stdin: bytes, env: dict[str, str], pid_file: Path
) -> tuple[subprocess.Popen[bytes], bytes, int]:
    given = pid_file.with_suffix(".in")
    given.write_bytes(stdin)
    with given.open("rb") as stdin_file:
        proc = subprocess.Popen(
            [*faults.TOWERCTL, "session", "request", s.id, *argv, "--macaroon", s.macaroon,
             "--agent", spec],
            stdin=stdin_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
        )  # fmt: skip
    assert proc.stdout is not None
    first = b""
    if "--batch" in argv:  # a batch runs its next line once the last outcome was read
        first = faults.read_line(proc.stdout.fileno(), 30)
    return proc, first, _wait_for(pid_file, proc)


def _after_the_signal(
    cli: CLI, db_url: str, s: OpenedSession, proc: subprocess.Popen[bytes], sig: int,
    agent_pid: int,
) -> tuple[bytes, bytes]:  # fmt: skip
    try:
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert _gone(agent_pid), "the agent's process outlived towerctl"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(agent_pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, err
    assert b"Traceback" not in err
    assert err.decode().strip().splitlines()[-1].startswith("towerctl: ")
    assert _towerctl_connections(db_url) == 0
    # The lease was given back: the next request runs at once (a held lease: "busy").
    after = cli("session", "request", s.id, "after", "--macaroon", s.macaroon, "--agent", "echo")
    assert after.exit_code == ExitCode.OK, after.stderr
    return out, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_every_terminating_signal_mid_batch(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path, sig: int
) -> None:
    s = open_session(cli, 10_000)
    spec = exec_agent(tmp_path, "agent", AGENT_BODY.format(pid_file=str(tmp_path / "slow.pid")))
    lines = b'{"message": "first"}\n{"message": "slow"}\n{"message": "third"}\n'
    proc, first, agent_pid = _run_until_slow(
        s, spec, ["--batch"], lines, tower_env, tmp_path / "slow.pid"
    )
    out, _ = _after_the_signal(cli, db_url, s, proc, sig, agent_pid)
    outcomes = [json.loads(line) for line in (first + out).splitlines()]
    assert [o["state"] for o in outcomes] == ["complete"]
    assert _recorded(db_url, s) == ["first", "after"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
def test_a_signal_while_one_request_waits_for_its_agent(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path, sig: int
) -> None:
    s = open_session(cli, 10_000)
    spec = exec_agent(tmp_path, "agent", AGENT_BODY.format(pid_file=str(tmp_path / "slow.pid")))
    proc, first, agent_pid = _run_until_slow(
        s, spec, ["-"], b"slow", tower_env, tmp_path / "slow.pid"
    )
    out, _ = _after_the_signal(cli, db_url, s, proc, sig, agent_pid)
    assert first + out == b""
    assert _recorded(db_url, s) == ["after"]
