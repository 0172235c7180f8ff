"""`session messages --follow`: the selection, then every message as it commits, in id
order, none missed or repeated; how it ends (signals, expiry, revocation, server gone)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import CLI, OpenedSession, open_session
from towerctl import migrations
from towerctl.errors import ExitCode

TOWERCTL = [sys.executable, "-m", "towerctl"]

# A writer that bypasses the request path on purpose: each transaction takes its
# message ids, then waits a random moment before it commits, so transactions of
# the same session commit out of id order (the case a naive `id > last` misses).
SQL_WRITER = r"""
import random, sys, time
import psycopg
url, sid, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
random.seed(seed)
end = time.monotonic() + seconds
with psycopg.connect(url, prepare_threshold=None) as c:
    n = 0
    while time.monotonic() < end:
        with c.transaction():
            rid = c.execute(
                "INSERT INTO session_requests (session_id, state, agent, completed_at)"
                " VALUES (%s, 'complete', 'test', now()) RETURNING id", (sid,)).fetchone()[0]
            c.execute(
                "INSERT INTO session_messages"
                " (session_id, role, content, session_request_id, token_count)"
                " VALUES (%s, 'user', %s, %s, 1), (%s, 'assistant', %s, %s, 1)",
                (sid, f"w{seed} q{n}", rid, sid, f"w{seed} a{n}", rid))
            time.sleep(random.random() * 0.15)
        n += 1
"""


def follower(
    env: dict[str, str], s: OpenedSession, out: Path, *args: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*TOWERCTL, "session", "messages", s.id, "--follow", *args, "--macaroon", s.macaroon],
        env=os.environ | env,
        stdout=out.open("wb"),
        stderr=subprocess.PIPE,
    )


def table_ids(conn: psycopg.Connection, sid: str) -> list[int]:
    rows = conn.execute(
        "SELECT id FROM session_messages WHERE session_id = %s ORDER BY id", (sid,)
    ).fetchall()
    return [int(r[0]) for r in rows]


def printed_ids(out: Path) -> list[int]:
    text = out.read_text()
    return [json.loads(line)["id"] for line in text.splitlines() if line.endswith("}")]


def wait_for(predicate, timeout: float, step: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


Following = Callable[..., tuple[subprocess.Popen[bytes], Path]]


@pytest.fixture
def following(
    tower_env: dict[str, str], tmp_path: Path, stopper: list[subprocess.Popen[bytes]]
) -> Following:
    """`following(s, name, *args)`: a follower of `s` writing to tmp_path/name, stopped
    at the end of the test; (the process, its output file)."""

    def start(s: OpenedSession, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        out = tmp_path / name
        follow = follower(tower_env, s, out, *args)
        stopper.append(follow)
        return follow, out

    return start


@pytest.mark.timeout(180)
def test_three_writers_follower_equals_the_table(
    cli: CLI,
    conn: psycopg.Connection,
    tower_env: dict[str, str],
    stopper: list[subprocess.Popen[bytes]],
    following: Following,
) -> None:
    s = open_session(cli, 10_000_000)
    for n in range(5):
        done = cli("session", "request", s.id, f"before {n}", "--macaroon", s.macaroon)
        assert done.exit_code == ExitCode.OK
    env = os.environ | tower_env | {"TOWER_BUSY_WAIT": "30"}
    seconds = "4"
    url = tower_env["TOWER_DATABASE_URL"]
    writers = [
        subprocess.Popen([sys.executable, "-c", SQL_WRITER, url, s.id, seconds, str(k)])
        for k in (1, 2)
    ]
    batch = "".join(json.dumps({"message": f"batch {n}"}) + "\n" for n in range(40))
    writers.append(
        subprocess.Popen(
            [*TOWERCTL, "session", "request", s.id, "--batch", "--macaroon", s.macaroon],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
    )
    stopper.extend(writers)
    writers[2].stdin.write(batch.encode())  # type: ignore[union-attr]
    writers[2].stdin.close()  # type: ignore[union-attr]
    time.sleep(0.7)  # writes are committing while the follower starts and prints its page
    follow, out = following(s, "follow.ndjson", "-f", "ndjson")
    for w in writers:
        assert w.wait(60) == 0
    final = table_ids(conn, s.id)
    assert len(final) > 60
    caught_up = wait_for(lambda: len(printed_ids(out)) >= len(final), 20)
    follow.send_signal(signal.SIGTERM)
    assert follow.wait(15) == ExitCode.OK, follow.stderr.read()  # type: ignore[union-attr]
    assert caught_up
    got = printed_ids(out)
    assert len(got) == len(set(got)), "a message was printed twice"
    assert got == final, "the follower's output differs from the table"


def request(cli: CLI, s: OpenedSession, text: str) -> None:
    assert cli("session", "request", s.id, text, "--macaroon", s.macaroon).exit_code == ExitCode.OK


@pytest.mark.timeout(60)
def test_live_messages_come_as_they_commit_then_sigint_ends_it(
    cli: CLI, following: Following
) -> None:
    s = open_session(cli, 1_000_000)
    request(cli, s, "first")
    follow, out = following(s, "follow.ndjson", "-f", "ndjson", "--last", "1")
    assert wait_for(lambda: len(printed_ids(out)) == 1, 15)
    assert json.loads(out.read_text())["content"] == "first"  # --last 1: the reply only
    request(cli, s, "second")
    assert wait_for(lambda: len(printed_ids(out)) == 3, 10)
    follow.send_signal(signal.SIGINT)
    assert follow.wait(10) == ExitCode.OK
    assert [json.loads(x)["content"] for x in out.read_text().splitlines()][1:] == [
        "second",
        "second",
    ]


@pytest.mark.timeout(60)
def test_table_follow_prints_new_rows(cli: CLI, following: Following) -> None:
    s = open_session(cli, 1_000_000)
    follow, out = following(s, "follow.txt", "-f", "table")
    assert wait_for(lambda: "content" in out.read_text(), 15)  # the header, nothing else
    request(cli, s, "hello table")
    assert wait_for(lambda: out.read_text().count("hello table") == 2, 10)
    follow.send_signal(signal.SIGTERM)
    assert follow.wait(10) == ExitCode.OK
    assert out.read_text().count("content") == 1  # one header


@pytest.mark.timeout(60)
def test_revoked_token_stops_the_follow_with_exit_3(cli: CLI, following: Following) -> None:
    s = open_session(cli, 1_000_000)
    follow, _out = following(s, "follow.ndjson", "-f", "ndjson")
    time.sleep(1.5)
    assert follow.poll() is None
    assert cli("macaroon", "revoke", s.macaroon).exit_code == ExitCode.OK
    assert follow.wait(20) == ExitCode.UNAUTHORIZED
    assert b"revoked" in follow.stderr.read()  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_session_expiry_ends_the_follow_normally(
    cli: CLI, conn: psycopg.Connection, following: Following
) -> None:
    s = open_session(cli, 1_000_000)
    follow, _out = following(s, "follow.ndjson", "-f", "ndjson")
    time.sleep(1.5)
    conn.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id = %s", (s.id,)
    )
    assert follow.wait(20) == ExitCode.OK


@pytest.mark.timeout(60)
def test_reader_gone_ends_it_quietly_even_when_nothing_is_written(
    cli: CLI, tower_env: dict[str, str]
) -> None:
    s = open_session(cli, 1_000_000)
    request(cli, s, "only")
    follow = subprocess.Popen(
        [*TOWERCTL, "session", "messages", s.id, "--follow", "-f", "ndjson",
         "--macaroon", s.macaroon],
        env=os.environ | tower_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        assert json.loads(follow.stdout.readline())["content"] == "only"
        follow.stdout.close()  # the reader goes away; no new message will ever come
        assert follow.wait(15) == ExitCode.OK
        assert follow.stderr.read() == b""  # type: ignore[union-attr]
    finally:
        if follow.poll() is None:
            follow.kill()


@pytest.mark.parametrize(
    "args",
    [["-f", "json"], ["-f", "csv"], ["-f", "markdown"], ["--before", "1"], ["--limit", "2"],
     ["-o", "x.ndjson", "-f", "ndjson"]],
)  # fmt: skip
def test_follow_refuses_what_it_cannot_do(cli: CLI, args: list[str]) -> None:
    s = open_session(cli)
    result = cli("session", "messages", s.id, "--follow", *args, "--macaroon", s.macaroon)
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr


@pytest.mark.timeout(120)
def test_server_stop_ends_the_follow_with_exit_8(tmp_path: Path) -> None:
    import pgserver

    with pgserver.pg_server() as server:
        with server.connect() as admin:
            admin.autocommit = True
            admin.execute("CREATE DATABASE follow")
        url = server.url("follow")
        with psycopg.connect(url, autocommit=True) as c:
            migrations.migrate(c, migrations.default_dir())
        env = {
            "TOWER_DATABASE_URL": url,
            "TOWER_HOME": str(tmp_path / "home"),
            "TOWER_ROOT_KEY": "a1" * 32,
            "NO_COLOR": "1",
        }
        opened = subprocess.run(
            [*TOWERCTL, "session", "open", "--deposit", "100", "--json"],
            env=os.environ | env, capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        doc = json.loads(opened.stdout)
        s = OpenedSession(doc["sessionId"], doc["macaroon"])
        follow = follower(env, s, tmp_path / "out", "-f", "ndjson")
        try:
            time.sleep(2)
            assert follow.poll() is None
            server.stop("fast")
            assert follow.wait(30) == ExitCode.UNREACHABLE
            assert b"lost the database connection" in follow.stderr.read()  # type: ignore[union-attr]
        finally:
            if follow.poll() is None:
                follow.kill()
