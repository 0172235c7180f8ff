#!/usr/bin/env python3
"""A store of a million sessions: support and operator commands against a 10,000-session one.

    python bench/scale.py                         # build both stores, measure, print markdown
    python bench/scale.py --pgdata DIR            # keep the server in DIR (build once)
    python bench/scale.py --pgdata DIR --reuse    # measure the stores already built in DIR
    python bench/run.py --only s                  # the same, inside the whole bench

Both stores are built by `scale_store.build` (1,000,000 and 10,000 sessions of the same
shape: ten requests, twenty messages and eleven ledger rows each) on one embedded
PostgreSQL, then every command is run as a user runs it (a `towerctl` process, the
database URL in TOWER_DATABASE_URL), big and small alternately after a warm-up; the
median of the runs is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, log, run_quiet
from scale_store import build

LETTER = "s"
BY_DEFAULT = False  # the build takes tens of minutes: `run.py --only s`
BIG, SMALL = 1_000_000, 10_000
STORES = {"big": ("scale_big", BIG), "small": ("scale_small", SMALL)}


def tower_env(server: Any, db: str, home: Path) -> dict[str, str]:
    import os

    drop = ("TOWER_", "PG", "DBMATE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {
        "TOWER_DATABASE_URL": server.url(db),
        "TOWER_HOME": str(home),
        "TOWER_ROOT_KEY": "c3" * 32,
        "NO_COLOR": "1",
    }


def build_stores(server: Any, towerctl: Path, home: Path, sizes: dict[str, int]) -> dict:
    import psycopg

    built: dict[str, Any] = {}
    server.admin.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
    server.admin.execute("SELECT pg_reload_conf()")
    for key, (db, _) in STORES.items():
        server.admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        server.admin.execute(f"CREATE DATABASE {db}")
        run_quiet([towerctl, "migrate"], tower_env(server, db, home))
        log(f"building the {key} store: {sizes[key]:,} sessions")
        with psycopg.connect(server.url(db), autocommit=True) as conn:
            built[key] = build(conn, sizes[key], log)
        log(f"{key} store: {json.dumps(built[key])}")
    return built


def main(argv: list[str] | None = None) -> int:
    from tools import Server, find_towerctl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgdata", type=Path, help="keep the server's data in this folder")
    parser.add_argument("--reuse", action="store_true", help="the stores are built already")
    parser.add_argument("--big", type=int, default=BIG, help="sessions of the big store")
    parser.add_argument("--small", type=int, default=SMALL, help="sessions of the small store")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)
    towerctl = find_towerctl(None)
    WORK.mkdir(parents=True, exist_ok=True)
    pgdata = args.pgdata or WORK / f"scale-{int(time.time())}"
    home = pgdata.parent / (pgdata.name + "-home")
    server = Server(pgdata, keep=args.pgdata is not None)
    try:
        if not args.reuse:
            build_stores(server, towerctl, home, {"big": args.big, "small": args.small})
        if args.build_only:
            return 0
        from scale_measure import measure, report_markdown

        results = measure(server, towerctl, home, args.runs)
        report_markdown(results, sys.stdout)
    finally:
        server.close()
    return 0


def run(bench: Any) -> None:
    """`bench/run.py --only s`: both stores on the bench's server, then the measurements."""
    from scale_measure import measure, to_workloads

    build_stores(bench.server, bench.tools.towerctl, bench.home, {"big": BIG, "small": SMALL})
    bench.workloads.extend(to_workloads(measure(bench.server, bench.tools.towerctl, bench.home, 7)))


if __name__ == "__main__":
    sys.exit(main())
