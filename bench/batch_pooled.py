#!/usr/bin/env python3
"""`session request --batch` against pgbench, on a session that already has history,
on a direct connection and through PgBouncer in transaction mode, side by side.

    python bench/batch_pooled.py [--requests 1000] [--history 500] [--reps 3] [--profile]

One PostgreSQL server of its own on 127.0.0.1 (tests/pgserver.py: password auth,
fsync off) and one PgBouncer in front of it. Each measured run gets a fresh copy of
a migrated template database holding one session with `--history` earlier requests
(two messages each). towerctl and pgbench run alternately after one warm-up each;
the table gives the median wall time per request and the ratio of throughputs, and
towerctl's fixed start-up (a batch of one line: interpreter, imports, connection,
macaroon check), which the per-request figure includes (spread over the batch).
`--profile` runs one towerctl batch under cProfile and prints where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import pgserver  # noqa: E402
from requests_batch import batch_message, pgbench_script  # noqa: E402

ROOT_KEY = "b2" * 32
SEED_HISTORY = """
WITH r AS (
    INSERT INTO session_requests (session_id, state, agent, input_tokens, output_tokens,
        cost_sats, debited_sats, balance_after_sats, completed_at)
    SELECT %(sid)s, 'complete', 'echo', 30, 30, 0, 0, 0, now()
    FROM generate_series(1, %(n)s)
    RETURNING id
)
INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
SELECT %(sid)s, m.role, 'earlier message of request ' || r.id, r.id, 8
FROM r, (VALUES ('user'), ('assistant')) AS m(role)
ORDER BY r.id"""


def towerctl(env: dict[str, str], *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "towerctl", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        **kw,
    )


class Bench:
    def __init__(self, server: pgserver.PgServer, bouncer: pgserver.PgBouncer, home: Path) -> None:
        self.server, self.bouncer, self.home = server, bouncer, home
        self.runs = 0

    def fresh(self, history: int) -> tuple[str, str, str]:
        """A fresh database with one session of `history` requests: (db, session, token)."""
        self.runs += 1
        db = f"bench_{self.runs}"
        with self.server.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}"')
            admin.execute(f'CREATE DATABASE "{db}" TEMPLATE batch_template')
        env = self.env(self.server.url(db))
        opened = json.loads(
            towerctl(env, "session", "open", "--deposit", "100000000", "--json").stdout
        )
        with self.server.connect(db) as conn:
            conn.execute(SEED_HISTORY, {"sid": opened["sessionId"], "n": history})
            conn.execute("VACUUM ANALYZE")
        return db, opened["sessionId"], opened["macaroon"]

    def env(self, url: str) -> dict[str, str]:
        return {
            "TOWER_DATABASE_URL": url,
            "TOWER_HOME": str(self.home),
            "TOWER_ROOT_KEY": ROOT_KEY,
            "NO_COLOR": "1",
        }

    def url(self, db: str, pooled: bool) -> str:
        return self.bouncer.url(db) if pooled else self.server.url(db)

    def towerctl(self, feed: Path, history: int, pooled: bool, profile: bool = False) -> float:
        db, sid, token = self.fresh(history)
        cmd = [sys.executable]
        if profile:
            cmd += ["-m", "cProfile", "-s", "tottime"]
        cmd += ["-m", "towerctl", "session", "request", sid, "--batch", "--macaroon", token]
        began = time.perf_counter()
        with feed.open("rb") as stdin:
            done = subprocess.run(
                cmd,
                env={**os.environ, **self.env(self.url(db, pooled))},
                stdin=stdin,
                capture_output=True,
                check=True,
            )
        took = time.perf_counter() - began
        if profile:
            text = done.stdout.decode()
            print(text[text.find("Ordered by") :][:6000])
        return took

    def pgbench(self, requests: int, history: int, pooled: bool, work: Path) -> float:
        db, sid, _token = self.fresh(history)
        script = work / f"pgbench-{db}.sql"
        script.write_text(pgbench_script(sid, batch_message(1)))
        port = self.bouncer.port if pooled else self.server.port
        env = {**os.environ, "PGPASSWORD": pgserver.PASSWORD}
        cmd = [str(pgserver.wheel_bin() / "pgbench"), "-n", "-M", "simple", "-c", "1"]
        cmd += ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-t", str(requests)]
        cmd += ["-f", str(script), db]
        began = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--history", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"towerctl-batch-bench-{os.getpid()}"
    work.mkdir()
    feed = work / "feed.ndjson"
    one = work / "one.ndjson"
    one.write_text(json.dumps({"message": batch_message(1)}) + "\n")
    feed.write_text(
        "".join(
            json.dumps({"message": batch_message(i)}) + "\n" for i in range(1, args.requests + 1)
        )
    )
    with (
        pgserver.pg_server() as server,
        pgserver.pgbouncer("127.0.0.1", server.port, pool_size=3) as bouncer,
    ):
        with server.connect() as admin:
            admin.execute("CREATE DATABASE batch_template")
        towerctl({"TOWER_DATABASE_URL": server.url("batch_template"), "TOWER_HOME": str(work)},
                 "migrate")  # fmt: skip
        bench = Bench(server, bouncer, work / "home")
        if args.profile:
            bench.towerctl(feed, args.history, pooled=False, profile=True)
            return
        rows = []
        before = " ".join(map(str, os.getloadavg()))
        for pooled in (False, True):
            where = "PgBouncer (transaction)" if pooled else "direct"
            bench.towerctl(feed, args.history, pooled)  # warm-ups
            bench.pgbench(args.requests, args.history, pooled, work)
            tower, pgb, start = [], [], []
            for _ in range(args.reps):
                tower.append(bench.towerctl(feed, args.history, pooled))
                pgb.append(bench.pgbench(args.requests, args.history, pooled, work))
                start.append(bench.towerctl(one, args.history, pooled))
            t, p = statistics.median(tower), statistics.median(pgb)
            rows.append((where, t, p, statistics.median(start)))
        print(f"{args.requests} echo requests, session with {args.history} earlier requests")
        print(f"load average before and after: {before} / {' '.join(map(str, os.getloadavg()))}")
        print(
            "| connection | towerctl ms/request | pgbench ms/request | throughput ratio "
            "| towerctl start-up s (1-line batch) |"
        )
        print("|---|---:|---:|---:|---:|")
        for where, t, p, s in rows:
            n = args.requests
            print(f"| {where} | {1000 * t / n:.2f} | {1000 * p / n:.2f} | {p / t:.2f}x | {s:.2f} |")


if __name__ == "__main__":
    main()
