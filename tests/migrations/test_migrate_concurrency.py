"""Concurrent `towerctl migrate` processes on a fresh database: no deadlock, each file once.

The packaged files are included (0007 builds an index CONCURRENTLY, which waits for
every transaction older than it: a runner waiting inside a transaction would deadlock
with it). Runners start together and the test waits for them to end: no sleeps.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import faults
from towerctl import migrations
from towerctl.errors import ExitCode

EXTRA = {
    # a slow transactional file and a counted insert after the packaged ones
    "0100_slow.sql": "SELECT pg_sleep(0.05);\nCREATE TABLE runs (n int);\n",
    "0101_count.sql": "INSERT INTO runs VALUES (1);\n",
    "0102_idx.sql": "-- towerctl:no-transaction\nSELECT pg_sleep(0.05);\n"
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS runs_n_idx ON runs (n);\n",
    "0103_after.sql": "INSERT INTO runs VALUES (2);\n",
}


def folder_with_packaged_files(tmp_path: Path) -> tuple[Path, list[int]]:
    folder = tmp_path / "sql"
    shutil.copytree(migrations.default_dir(), folder)
    for name, body in EXTRA.items():
        (folder / name).write_text(body)
    return folder, [m.version for m in migrations.discover(folder)]


def one_round(server_url: str, folder: Path, versions: list[int], runners: int) -> float:
    name = f"towerctl_race_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(server_url, dbname=name)
    try:
        env = faults.process_env({"TOWER_DATABASE_URL": url, "TOWER_HOME": str(folder.parent)})
        argv = [sys.executable, "-m", "towerctl", "migrate", "--dir", str(folder)]
        began = time.monotonic()
        procs = [
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(runners)
        ]
        outcomes = [p.communicate(timeout=120) for p in procs]
        elapsed = time.monotonic() - began
        stderr = [err.decode() for _, err in outcomes]
        for p, err in zip(procs, stderr, strict=True):
            assert "Traceback" not in err and "internal error" not in err, err
            # --lock-timeout 60 (the default) is never reached here: every runner ends well.
            assert p.returncode == ExitCode.OK, err
        applied = re.findall(r"^applied (\d+)_\S+ \(", "".join(stderr), re.MULTILINE)
        assert sorted(int(v) for v in applied) == versions, "each file applied by one runner"
        with psycopg.connect(url, autocommit=True) as c:
            ledger = [r[0] for r in c.execute("SELECT version FROM tower_schema_migrations")]
            assert sorted(ledger) == versions
            assert c.execute("SELECT n FROM runs ORDER BY n").fetchall() == [(1,), (2,)]
            invalid = c.execute(migrations.INVALID_INDEXES).fetchall()
            assert invalid == []
            assert c.execute("SELECT count(*) FROM tower_schema_migration_lease").fetchone() == (0,)
        return elapsed
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("runners", "rounds"), [(4, 12), (8, 5)])
def test_concurrent_runners_never_deadlock_and_apply_each_file_once(
    server_url: str, tmp_path: Path, runners: int, rounds: int, record_property: object
) -> None:
    folder, versions = folder_with_packaged_files(tmp_path)
    times = [one_round(server_url, folder, versions, runners) for _ in range(rounds)]
    print(f"{runners} runners x {rounds} rounds: max {max(times):.2f}s, total {sum(times):.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("runners", [4, 8])
def test_twenty_rounds(server_url: str, tmp_path: Path, runners: int) -> None:
    folder, versions = folder_with_packaged_files(tmp_path)
    for _ in range(20):
        one_round(server_url, folder, versions, runners)
