"""A batch and the reader of its outcomes (SPEC 11): each outcome is written before the
next line runs, and a batch whose reader goes away records at most the line whose
agent was already called, then exits 10."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import faults
from conftest import CLI, OpenedSession, open_session
from towerctl.errors import ExitCode


def _batch_argv(s: OpenedSession) -> list[str]:
    return [*faults.TOWERCTL, "session", "request", s.id, "--batch", "--macaroon", s.macaroon]


@contextlib.contextmanager
def _batch(
    s: OpenedSession, tower_env: dict[str, str], stdin: Any, stderr: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """`session request S --batch` under way, its stdout on a pipe; killed if it
    outlives the block."""
    proc = subprocess.Popen(
        _batch_argv(s),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, **tower_env},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def _recorded(db_url: str, s: OpenedSession) -> int:
    with psycopg.connect(db_url, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM session_requests WHERE session_id = %s", (s.id,))
        count = row.fetchone()
    assert count is not None
    return int(count[0])


def _lines(count: int) -> bytes:
    return b"".join(b'{"message": "line %d"}\n' % n for n in range(count))


@pytest.mark.timeout(120)
def test_a_batch_piped_to_head_1_exits_10_and_records_at_most_two(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path
) -> None:
    """`towerctl session request S --batch < 200 lines | head -1`, as a shell runs it."""
    feed = tmp_path / "batch.ndjson"
    feed.write_bytes(_lines(200))
    for attempt in range(3):
        s = open_session(cli, 1_000_000)
        command = " ".join([*_batch_argv(s), "<", str(feed), "| head -1"])
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"],
            env={**os.environ, **tower_env},
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == ExitCode.WRITE_FAILED, (attempt, done.stderr)
        assert json.loads(done.stdout)["result"] == "line 0"
        assert done.stderr.count(b"\n") == 1 and b"Traceback" not in done.stderr, done.stderr
        assert 1 <= _recorded(db_url, s) <= 2, attempt


@pytest.mark.timeout(120)
def test_no_line_runs_once_the_reader_has_gone(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path
) -> None:
    """The reader takes the first outcome and goes away before the next line arrives:
    that line is not run (nobody could read its outcome), and the batch exits 10."""
    s = open_session(cli, 1_000_000)
    with (
        open(tmp_path / "stderr", "w+b") as err,
        _batch(s, tower_env, subprocess.PIPE, err) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(_lines(1))
        proc.stdin.flush()
        first = json.loads(faults.read_line(proc.stdout.fileno(), 30))
        proc.stdout.close()  # the reader goes away
        with contextlib.suppress(BrokenPipeError):  # towerctl may have stopped reading
            proc.stdin.write(_lines(50))
            proc.stdin.close()
        code = proc.wait(timeout=60)
        err.seek(0)
        said = err.read().decode()
    assert first["state"] == "complete"
    assert code == ExitCode.WRITE_FAILED, said
    assert "1 line answered; no further line was run" in said, said
    assert _recorded(db_url, s) == 1


@pytest.mark.timeout(120)
def test_a_reader_that_stops_reading_stops_the_batch_within_a_line(
    cli: CLI, db_url: str, tower_env: dict[str, str], tmp_path: Path
) -> None:
    """The reader takes the first outcome, then reads no more for a while before it goes
    away (as `head -1` does while it exits): the batch runs at most one more line
    meanwhile, not the whole input into the pipe's buffer."""
    s = open_session(cli, 1_000_000)
    feed = tmp_path / "batch.ndjson"
    feed.write_bytes(_lines(200))
    with (
        open(feed, "rb") as lines,
        open(tmp_path / "stderr", "w+b") as err,
        _batch(s, tower_env, lines, err) as proc,
    ):
        assert proc.stdout is not None
        first = json.loads(faults.read_line(proc.stdout.fileno(), 30))
        time.sleep(1.0)
        proc.stdout.close()  # the reader goes away
        code = proc.wait(timeout=60)
        err.seek(0)
        said = err.read().decode()
    assert first["result"] == "line 0"
    assert code == ExitCode.WRITE_FAILED, said
    assert 1 <= _recorded(db_url, s) <= 2


@pytest.mark.timeout(90)
def test_each_answer_comes_before_the_next_line_is_sent(
    cli: CLI, tower_env: dict[str, str]
) -> None:
    """A writer that sends a line and waits for its answer (a co-process) gets it."""
    s = open_session(cli, 1_000_000)
    with _batch(s, tower_env, subprocess.PIPE, subprocess.DEVNULL) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for n in range(12):
            proc.stdin.write(b'{"message": "turn %d"}\n' % n)
            proc.stdin.flush()
            answer = json.loads(faults.read_line(proc.stdout.fileno(), 20))
            assert answer["result"] == f"turn {n}" and answer["state"] == "complete"
        proc.stdin.close()
        assert proc.wait(timeout=30) == ExitCode.OK
