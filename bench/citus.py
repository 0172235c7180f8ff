#!/usr/bin/env python3
"""A request and a transcript page through a Citus coordinator beside the same on a plain
PostgreSQL on the same machine (issue 30): each a `towerctl` process as a user runs it.

    python bench/citus.py --plain URL --citus URL [--runs 21]

Both URLs name fresh databases (the Citus one on a coordinator with its workers added;
docs/scaling.md says how such a cluster is built by hand). The harness migrates both,
runs `db distribute` on the coordinator, opens one session on each with a transcript
of 100 messages, then alternates (plain, Citus, plain, ...) after one unmeasured
warm-up each:

    towerctl session request SID MESSAGE             (the echo agent: the store's share)
    towerctl session messages SID --limit 100 --format ndjson

Medians and Citus / plain. Goal: each <= 2x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sample, alternate, run_quiet, run_timed
from tools import find_towerctl

GOAL = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plain", required=True, help="a fresh database on plain PostgreSQL")
    parser.add_argument("--citus", required=True, help="a fresh database on a Citus coordinator")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--towerctl")
    args = parser.parse_args()
    towerctl = find_towerctl(args.towerctl)
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"towerctl-bench-citus-{os.getpid()}"
    home.mkdir(exist_ok=True)
    stores = {"plain": args.plain, "citus": args.citus}
    prepared = {name: prepare(towerctl, url, home, name == "citus") for name, url in stores.items()}

    def command(name: str, *argv: str) -> Sample:
        env, session, token = prepared[name]
        return run_timed([towerctl, "session", *argv[:1], session, *argv[1:]], env | {
            "TOWER_MACAROON": token})  # fmt: skip

    rows = []
    for label, argv in (
        ("session request (echo)", ("request", "a question for the bench")),
        ("session messages --limit 100", ("messages", "--limit", "100", "--format", "ndjson")),
    ):
        plain, citus = alternate(
            [(n, lambda n=n, a=argv: command(n, *a)) for n in ("plain", "citus")],  # type: ignore[misc]
            args.runs,
        )
        p = statistics.median(s.seconds for s in plain.samples)
        c = statistics.median(s.seconds for s in citus.samples)
        rows.append((label, p, c, c / p))
    print("| command | plain PostgreSQL | Citus coordinator | ratio | goal | met |")
    print("|---|---:|---:|---:|---|---|")
    for label, p, c, ratio in rows:
        met = "yes" if ratio <= GOAL else "**no**"
        figures = f"{p * 1000:.0f} ms | {c * 1000:.0f} ms | {ratio:.2f}×"
        print(f"| `{label}` | {figures} | ≤ {GOAL}× | {met} |")


def prepare(towerctl: Path, url: str, home: Path, citus: bool) -> tuple[dict[str, str], str, str]:
    """Migrate (and distribute), open a session with 100 messages: env, id, token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOWER_")}
    env |= {"TOWER_DATABASE_URL": url, "TOWER_HOME": str(home), "NO_COLOR": "1"}
    run_quiet([towerctl, "migrate"], env)
    if citus:
        run_quiet([towerctl, "db", "distribute"], env)
    opened = json.loads(run_quiet([towerctl, "session", "open", "--deposit", "1000000",
                                   "--json"], env))  # fmt: skip
    session, token = opened["sessionId"], opened["macaroon"]
    lines = "".join(json.dumps({"message": f"message {i}"}) + "\n" for i in range(50))
    batch = home / "batch.ndjson"
    batch.write_text(lines)
    with batch.open("rb") as stdin:
        run_quiet([towerctl, "session", "request", session, "--batch"],
                  env | {"TOWER_MACAROON": token}, stdin=stdin)  # fmt: skip
    return env, session, token


if __name__ == "__main__":
    main()
