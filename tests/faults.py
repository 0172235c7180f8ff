"""Fault injection for the crash-safety tests: real towerctl processes, killed or cut off.

towerctl runs as a real process (`python -m towerctl`) with stdin read from a
file and stdout/stderr written to files, so a kill never leaves a pipe half
read and the output survives the process. `OwnServer` is an embedded
PostgreSQL server of the test's own that may be stopped and started again
(the shared test server must never be).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import pgserver

TOWERCTL = (sys.executable, "-m", "towerctl")


def process_env(extra: dict[str, str]) -> dict[str, str]:
    """os.environ without any TOWER_* setting of the caller's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    env.update(extra)
    return env


@dataclass
class Towerctl:
    """A towerctl process started in the background; output goes to files."""

    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    started: float
    killed_at: float | None = None

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def complete_lines(self) -> list[str]:
        """The stdout lines written so far that end in a newline (a torn last line is dropped)."""
        text = self.stdout
        return text.splitlines()[: text.count("\n")]

    def kill(self) -> bool:
        """SIGKILL the process; True when it was still running (False: it had already exited)."""
        if self.proc.poll() is not None:
            return False
        self.killed_at = time.time()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        return self.proc.returncode == -signal.SIGKILL

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise


def start(args: Sequence[str], env: dict[str, str], folder: Path, stdin: str = "") -> Towerctl:
    """Start `towerctl ARGS` with `stdin` as its standard input (from a file, read at its pace)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob("stdin-*")))
    stdin_path = folder / f"stdin-{n}"
    stdout_path, stderr_path = folder / f"stdout-{n}", folder / f"stderr-{n}"
    stdin_path.write_text(stdin, encoding="utf-8")
    with (
        stdin_path.open("rb") as fin,
        stdout_path.open("wb") as fout,
        stderr_path.open("wb") as ferr,
    ):
        proc = subprocess.Popen(
            [*TOWERCTL, *args], env=env, stdin=fin, stdout=fout, stderr=ferr, close_fds=True
        )
    return Towerctl(proc, stdout_path, stderr_path, time.time())


def run(
    args: Sequence[str], env: dict[str, str], stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `towerctl ARGS` to the end; returns the CompletedProcess (text)."""
    return subprocess.run(
        [*TOWERCTL, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_line(fd: int, timeout: float) -> bytes:
    """One line from `fd` (a pipe of towerctl's output), read a byte at a time so nothing
    past it is taken; fails the test when none comes within `timeout` seconds."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line within {timeout}s (so far {line!r})")
        byte = os.read(fd, 1)
        assert byte, "towerctl closed its output"
        line += byte
    return line


def wait_until(
    proc: Towerctl, condition: Any, what: str, timeout: float = 60, poll: float = 0.002
) -> bool:
    """Poll `condition()` until it holds (True) or the process exits first (False).

    Crash tests kill on observed events (a line printed, a row committed, an agent
    started), never after a sleep that assumes a machine's speed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.proc.poll() is not None:
            return bool(condition())
        time.sleep(poll)
    proc.kill()
    raise AssertionError(f"no {what} within {timeout}s: {proc.stderr}")


def agent_starts(log: Path) -> int:
    """How many agent runs recorded in `log` have started."""
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.startswith("S "))


def sleepy_agent(folder: Path, seconds: float) -> str:
    """An exec agent that sleeps `seconds` then echoes the message; returns the `--agent` spec.

    When CRASH_AGENT_LOG names a file it appends `S pid time` when it starts and
    `E pid time` before it replies, so a test can tell whether a kill landed
    while an agent ran.
    """
    path = folder / "sleepy_agent.py"
    path.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "LOG = os.environ.get('CRASH_AGENT_LOG')\n"
        "def note(mark):\n"
        "    if LOG:\n"
        "        with open(LOG, 'a') as f:\n"
        "            f.write(f'{mark} {os.getpid()} {time.time():.6f}\\n')\n"
        "note('S')\n"
        "conv = json.load(sys.stdin)\n"
        f"time.sleep({seconds!r})\n"
        "note('E')\n"
        "print('agent: ' + conv['messages'][-1]['content'])\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f"exec:{path}"


def agent_running_at(log: Path, moment: float) -> bool:
    """Whether some agent run recorded in `log` had started but not ended at `moment`."""
    if not log.exists():
        return False
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        mark, pid, when = parts
        (starts if mark == "S" else ends)[pid] = float(when)
    return any(s <= moment and ends.get(pid, float("inf")) >= moment for pid, s in starts.items())


@dataclass(frozen=True)
class StoreFigures:
    """What the database holds for one session."""

    balance: int
    deposits: int
    debits_ledger: int
    debits_requests: int
    requests: int
    requests_without_user_message: int
    complete_without_assistant_message: int
    keys: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (request id, debit)


def store_figures(url: str, session_id: str) -> StoreFigures:
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            """
            SELECT s.balance_sats,
              (SELECT coalesce(sum(amount_sats), 0) FROM balance_ledger
                WHERE session_id = s.id AND kind IN ('deposit', 'topup')),
              (SELECT coalesce(sum(amount_sats), 0) FROM balance_ledger
                WHERE session_id = s.id AND kind = 'debit'),
              (SELECT coalesce(sum(debited_sats), 0) FROM session_requests
                WHERE session_id = s.id),
              (SELECT count(*) FROM session_requests WHERE session_id = s.id),
              (SELECT count(*) FROM session_requests r WHERE r.session_id = s.id
                AND NOT EXISTS (SELECT 1 FROM session_messages m WHERE m.session_id = r.session_id
                  AND m.session_request_id = r.id AND m.role = 'user')),
              (SELECT count(*) FROM session_requests r WHERE r.session_id = s.id
                AND r.state = 'complete'
                AND NOT EXISTS (SELECT 1 FROM session_messages m WHERE m.session_id = r.session_id
                  AND m.session_request_id = r.id AND m.role = 'assistant'))
            FROM sessions s WHERE s.id = %s
            """,
            (session_id,),
        ).fetchone()
        assert row is not None, f"session {session_id} not found"
        keys = {
            k: (rid, debit)
            for k, rid, debit in c.execute(
                "SELECT idempotency_key, id, debited_sats FROM session_requests"
                " WHERE session_id = %s AND idempotency_key IS NOT NULL",
                (session_id,),
            )
        }
    balance, deposits, debits_ledger, debits_requests, requests, no_user, no_assistant = row
    return StoreFigures(
        balance=int(balance),
        deposits=int(deposits),
        debits_ledger=int(debits_ledger),
        debits_requests=int(debits_requests),
        requests=int(requests),
        requests_without_user_message=int(no_user),
        complete_without_assistant_message=int(no_assistant),
        keys=keys,
    )


# --- a PostgreSQL server of the test's own ----------------------------------


class OwnServer:
    """A PostgreSQL server that this test alone uses, and may stop and start again
    (tests/pgserver.py: 127.0.0.1, password authentication, private socket)."""

    def __init__(self) -> None:
        self._server = pgserver.PgServer()
        try:
            self._server.init()
            self._server.start()
        except BaseException:
            self._server.close()
            raise
        self.url: str = self._server.url()

    def stop(self, mode: str = "fast") -> float:
        """`pg_ctl stop -m MODE -w`; returns how long it took."""
        return self._server.stop(mode)

    def start(self) -> float:
        """Start it again on the same port; returns how long it took."""
        return self._server.start()

    def log_tail(self, lines: int = 20) -> str:
        return self._server.log_tail(lines)

    def close(self) -> None:
        self._server.close()


@contextlib.contextmanager
def own_server() -> Iterator[OwnServer]:
    server = OwnServer()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on `folder` with mount(8)'s `options` (needs root: skipped with the
    reason otherwise), unmounted after."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs ({options}) needs root; run the suite as root")
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True, timeout=30,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)
