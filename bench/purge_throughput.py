#!/usr/bin/env python3
"""Purge throughput: `towerctl session purge` over 1,000,000 messages of expired sessions.

    python bench/purge_throughput.py                       # a throwaway server of its own
    python bench/purge_throughput.py --database-url URL    # a fresh database on that server
    python bench/purge_throughput.py --messages 100000 --runs 1

Each run: a fresh database (CREATE DATABASE, `towerctl migrate`), seeded by SQL
(generate_series: sessions expired 30 days ago, each request with its user and
assistant message, as a request writes them), a CHECKPOINT and VACUUM ANALYZE,
then the timed part: the whole `towerctl session purge --expired-for 7d --yes --json`
process, fork to exit. It prints messages per second per run and the median, and
checks that every message went and that `towerctl doctor` is clean afterwards.
Run it with the project's interpreter (`. .venv/bin/activate`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from expired_histories import seed_expired  # noqa: E402

TOWERCTL = [sys.executable, "-m", "towerctl"]


def one_run(server_url: str, messages: int, sessions: int, home: Path) -> dict[str, float]:
    name = f"towerctl_purge_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(server_url, dbname=name)
    env = os.environ | {
        "TOWER_DATABASE_URL": url,
        "TOWER_HOME": str(home),
        "TOWER_ROOT_KEY": "b2" * 32,
        "NO_COLOR": "1",
    }
    try:
        subprocess.run([*TOWERCTL, "migrate"], env=env, check=True, capture_output=True)
        with psycopg.connect(url, autocommit=True) as conn:
            started = time.perf_counter()
            seed_expired(conn, sessions, messages // sessions // 2, repeat=8, tokens=20)
            seeded = time.perf_counter() - started
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
            row = conn.execute("SELECT count(*) FROM session_messages").fetchone()
            total = int(row[0]) if row else 0
        started = time.perf_counter()
        done = subprocess.run(
            [*TOWERCTL, "session", "purge", "--expired-for", "7d", "--yes", "--json"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        result = json.loads(done.stdout)
        assert result["messages"] == total, (result, total)
        doctor = subprocess.run([*TOWERCTL, "doctor"], env=env, capture_output=True, text=True)
        assert doctor.returncode == 0, doctor.stdout
        return {"messages": total, "seconds": seconds, "perSecond": total / seconds,
                "seedSeconds": seeded}  # fmt: skip
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="a server to create throwaway databases on")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"towerctl-bench-{uuid.uuid4().hex[:8]}"
    runs = []
    if args.database_url:
        runs = [one_run(args.database_url, args.messages, args.sessions, home)
                for _ in range(args.runs)]  # fmt: skip
    else:
        import pgserver  # the tests' own throwaway server (127.0.0.1, password auth)

        with pgserver.pg_server() as server:
            with server.connect() as probe:
                version = probe.execute("SHOW server_version").fetchone()
            print(f"PostgreSQL {version[0] if version else '?'}", file=sys.stderr)
            runs = [one_run(server.url(), args.messages, args.sessions, home)
                    for _ in range(args.runs)]  # fmt: skip
    for n, run in enumerate(runs, 1):
        print(
            f"run {n}: {run['messages']:,} messages purged in {run['seconds']:.2f} s"
            f" = {run['perSecond']:,.0f} messages/s (seeded in {run['seedSeconds']:.1f} s)"
        )
    median = statistics.median(r["perSecond"] for r in runs)
    print(f"median: {median:,.0f} messages/s over {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
