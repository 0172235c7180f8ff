"""Reads from a real streaming hot standby (SPEC 13).

A primary and a standby of the tests' own (tests/pgserver.py, pg_basebackup -R),
the database migrated by towerctl. `session messages`, `show` and `list` with
`--read-database-url` (or TOWER_READ_DATABASE_URL) read from the standby, their
macaroon check included; writes sent to the standby are refused with one line;
a lagging standby is refused with one line; the primary may be down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pgserver
from conftest import ROOT_KEY_HEX
from towerctl import migrations
from towerctl.errors import ExitCode

pytestmark = pytest.mark.timeout(180)
DB = "replica_test"
TOWERCTL = [sys.executable, "-m", "towerctl"]


@dataclass
class Pair:
    primary: pgserver.PgServer
    standby: pgserver.PgServer
    home: Path

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "TOWER_DATABASE_URL": self.primary.url(DB),
            "TOWER_HOME": str(self.home),
            "TOWER_ROOT_KEY": ROOT_KEY_HEX,
            "NO_COLOR": "1",
            **extra,
        }

    def replay(self) -> None:
        pgserver.wait_for_replay(self.primary, self.standby, DB)


def towerctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    return subprocess.run(
        [sys.executable, "-m", "towerctl", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with pgserver.pg_server() as primary:
        with primary.connect() as admin:
            admin.execute(f"CREATE DATABASE {DB}")
        home = tmp_path_factory.mktemp("replica-home")
        migrated = towerctl(
            {"TOWER_DATABASE_URL": primary.url(DB), "TOWER_HOME": str(home)}, "migrate"
        )
        assert migrated.returncode == 0, migrated.stderr
        standby = primary.standby_of()
        try:
            p = Pair(primary, standby, home)
            p.replay()
            yield p
        finally:
            standby.close()


def opened(pair: Pair, deposit: int = 10_000) -> tuple[str, str]:
    done = towerctl(pair.env(), "session", "open", "--deposit", str(deposit), "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    return doc["sessionId"], doc["macaroon"]


def ask(pair: Pair, sid: str, token: str, message: str) -> None:
    done = towerctl(pair.env(), "session", "request", sid, message, "--macaroon", token)
    assert done.returncode == ExitCode.OK, done.stderr


def export(pair: Pair, sid: str, token: str, **env: str) -> subprocess.CompletedProcess[str]:
    return towerctl(
        pair.env(TOWER_READ_DATABASE_URL=pair.standby.url(DB), **env),
        "session",
        "messages",
        sid,
        "--format",
        "ndjson",
        "--macaroon",
        token,
    )


def contents(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [json.loads(line)["content"] for line in done.stdout.splitlines()]


def test_messages_appear_on_the_replica_once_replayed(pair: Pair) -> None:
    sid, token = opened(pair)
    ask(pair, sid, token, "first")
    pair.replay()
    assert contents(export(pair, sid, token)) == ["first", "first"]
    with pair.standby.connect(DB) as standby:
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            ask(pair, sid, token, "second")
            # Replay paused: the replica still shows the first page, no half of the second.
            done = export(pair, sid, token, TOWER_READ_MAX_LAG="3600")
            assert done.returncode == ExitCode.OK, done.stderr
            assert contents(done) == ["first", "first"]
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")
    pair.replay()
    assert contents(export(pair, sid, token)) == ["first", "first", "second", "second"]


def test_show_and_list_read_the_replica(pair: Pair) -> None:
    sid, _token = opened(pair, 777)
    pair.replay()
    env = pair.env()
    env.pop("TOWER_DATABASE_URL")
    env["TOWER_DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"  # a primary never used
    read = ["--read-database-url", pair.standby.url(DB)]
    shown = towerctl(env, *read, "session", "show", sid, "--json")
    assert shown.returncode == ExitCode.OK, shown.stderr
    assert json.loads(shown.stdout)["balanceSats"] == 777
    listed = towerctl(env, *read, "session", "list", "--json")
    assert listed.returncode == ExitCode.OK, listed.stderr
    assert sid in {s["sessionId"] for s in json.loads(listed.stdout)["sessions"]}


def test_a_revocation_takes_effect_on_the_replica_once_replayed(pair: Pair) -> None:
    sid, token = opened(pair)
    ask(pair, sid, token, "hello")
    pair.replay()
    with pair.standby.connect(DB) as standby:
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            revoked = towerctl(pair.env(), "macaroon", "revoke", token)
            assert revoked.returncode == ExitCode.OK, revoked.stderr
            # The check runs on the replica: until it replays the revocation, it allows.
            before = export(pair, sid, token, TOWER_READ_MAX_LAG="3600")
            assert before.returncode == ExitCode.OK, before.stderr
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")
    pair.replay()
    after = export(pair, sid, token)
    assert after.returncode == ExitCode.UNAUTHORIZED, after.stderr
    assert after.stdout == "" and after.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ("session", "request", "{sid}", "write me", "--macaroon", "{token}"),
        ("session", "topup", "{sid}", "--sats", "5"),
        ("session", "open", "--deposit", "5"),
        ("migrate", "--dir", "{pending}"),
    ],
    ids=["request", "topup", "open", "migrate"],
)
def test_writes_sent_to_the_standby_are_refused_with_one_line(
    pair: Pair, args: tuple[str, ...], tmp_path: Path
) -> None:
    sid, token = opened(pair)
    pair.replay()
    pending = tmp_path / "sql"  # the project's migrations and one more, pending
    shutil.copytree(migrations.default_dir(), pending)
    (pending / "9999_extra.sql").write_text("CREATE TABLE extra (x int);\n")
    argv = [a.format(sid=sid, token=token, pending=pending) for a in args]
    done = towerctl(pair.env(TOWER_DATABASE_URL=pair.standby.url(DB)), *argv)
    assert done.returncode == ExitCode.UNREACHABLE, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "read-only" in done.stderr and "primary" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_lagging_replica_is_refused_with_one_line(pair: Pair) -> None:
    sid, token = opened(pair)
    pair.replay()
    with pair.standby.connect(DB) as standby:
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            ask(pair, sid, token, "not yet replayed")
            deadline = time.monotonic() + 30
            while True:  # until the standby has received WAL that it has not replayed
                row = standby.execute(
                    "SELECT pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()"
                ).fetchone()
                if row and row[0]:
                    break
                assert time.monotonic() < deadline, "the standby never received the write"
                time.sleep(0.02)
            done = export(pair, sid, token, TOWER_READ_MAX_LAG="0")
            assert done.returncode == ExitCode.UNREACHABLE, done.stderr
            assert done.stdout == "" and done.stderr.count("\n") == 1
            assert "behind the primary" in done.stderr
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")
    pair.replay()
    done = export(pair, sid, token, TOWER_READ_MAX_LAG="0")
    assert done.returncode == ExitCode.OK, done.stderr
    assert contents(done)[-1] == "not yet replayed"


def test_export_from_the_replica_while_the_primary_is_down(pair: Pair) -> None:
    sid, token = opened(pair)
    ask(pair, sid, token, "kept")
    pair.replay()
    pair.primary.stop("fast")
    try:
        done = export(pair, sid, token)
        assert done.returncode == ExitCode.OK, done.stderr
        assert contents(done) == ["kept", "kept"]
        shown = towerctl(
            pair.env(),
            "--read-database-url",
            pair.standby.url(DB),
            "session",
            "show",
            sid,
            "--json",
        )
        assert shown.returncode == ExitCode.OK, shown.stderr
    finally:
        pair.primary.start()


SEED = """
WITH r AS (
    INSERT INTO session_requests (session_id, state, agent)
    VALUES (%(sid)s, 'complete', 'echo') RETURNING id
)
INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
SELECT %(sid)s, 'user', 'message ' || g || ' ' || repeat('lorem ipsum ', 8), r.id, 30
FROM r, generate_series(1, %(n)s) AS g"""


def test_a_recovery_conflict_is_a_clear_error_never_a_wrong_page(pair: Pair) -> None:
    """The standby cancels towerctl's read to replay a VACUUM that removes rows its
    snapshot may still need (max_standby_streaming_delay = 0): one clear line, exit 8,
    and what was printed before is exactly the start of the answer."""
    sid, token = opened(pair)
    with pair.primary.connect(DB) as primary:
        primary.execute(SEED, {"sid": sid, "n": 20_000})
        primary.execute("CREATE TABLE churn AS SELECT g FROM generate_series(1, 5000) AS g")
    pair.replay()
    with pair.standby.connect(DB) as standby:
        standby.execute("ALTER SYSTEM SET max_standby_streaming_delay = 0")
        standby.execute("SELECT pg_reload_conf()")
        try:
            before = conflicts(standby)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "towerctl",
                    "session",
                    "messages",
                    sid,
                    "--format",
                    "markdown",
                    "--macaroon",
                    token,
                ],
                env={
                    **{k: v for k, v in os.environ.items() if not k.startswith("TOWER_")},
                    **pair.env(TOWER_READ_DATABASE_URL=pair.standby.url(DB)),
                },
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                # towerctl holds a snapshot on the standby, blocked on its full stdout pipe.
                wait_until(
                    "towerctl's snapshot on the standby",
                    lambda: bool(
                        standby.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name"
                            " = 'towerctl-read' AND backend_xmin IS NOT NULL"
                        ).fetchone()[0]  # type: ignore[index]
                    ),
                )
                with pair.primary.connect(DB) as primary:
                    primary.execute("DELETE FROM churn")
                    primary.execute("VACUUM churn")
                wait_until("the recovery conflict", lambda: conflicts(standby) > before)
                out, err = proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate(timeout=30)
        finally:
            standby.execute("ALTER SYSTEM RESET max_standby_streaming_delay")
            standby.execute("SELECT pg_reload_conf()")
    assert proc.returncode == ExitCode.UNREACHABLE, err
    assert err.count("\n") == 1 and "recovery conflict" in err, err
    assert "Traceback" not in err
    shown = [line for line in out.splitlines() if line.startswith("message ")]
    assert [int(line.split()[1]) for line in shown] == list(range(1, len(shown) + 1))
    assert len(shown) < 20_000


def conflicts(standby: object) -> int:
    row = standby.execute(  # type: ignore[attr-defined]
        "SELECT confl_snapshot + confl_lock + confl_bufferpin + confl_deadlock"
        " FROM pg_stat_database_conflicts WHERE datname = current_database()"
    ).fetchone()
    return int(row[0])


def wait_until(what: str, seen: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not seen():
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.02)
