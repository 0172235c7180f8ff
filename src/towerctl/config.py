"""Settings read from the environment, each in one place with its default.

Precedence for every setting: command-line flag (handled by the CLI), then the
environment variable named here, then the default.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from towerctl import bounds
from towerctl.bounds import Bound
from towerctl.errors import BadInput


def home() -> Path:
    """`TOWER_HOME`, or the platform's user data folder for towerctl (not created here)."""
    explicit = os.environ.get("TOWER_HOME")
    if explicit:
        return Path(explicit).expanduser()
    import platformdirs

    return platformdirs.user_data_path("towerctl")


def ensure_home(folder: Path | None = None) -> Path:
    """TOWER_HOME (or `folder`), created 0700 whatever the umask, or checked when it exists.

    A home that another user owns, or that group or others may write to, is
    refused (exit 2): whoever can write there can replace `root.key`.
    """
    path = home() if folder is None else folder
    private_folder(path, "TOWER_HOME")
    return path


@contextmanager
def exclusive_lock(path: Path, flags: int) -> Iterator[None]:
    """An exclusive advisory lock (flock) on `path`, opened with `flags` (a file it
    creates is the user's, 0600), held for the block."""
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def private_folder(path: Path, what: str) -> None:
    """Create `path` (and its missing parents) 0700, or check the one that exists.

    Only folders created here get their mode set; an existing folder is never
    changed, only refused (exit 2) when another user owns it or others may write to it.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # someone else made it meanwhile: checked below, never changed
        except OSError as error:
            raise BadInput(f"cannot create {what} {folder}: {error.strerror}") from None
        os.chmod(folder, 0o700)  # mkdir's mode passes through the umask; set it exactly
    _check_own_folder(path, what)


def _check_own_folder(path: Path, what: str) -> None:
    try:
        link = os.lstat(path)
        info = os.stat(path)
    except OSError as error:
        raise BadInput(f"cannot use {what} {path}: {error.strerror}") from None
    me = os.geteuid()
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
        raise BadInput(f"{what} {path} is a symbolic link owned by another user")
    if not stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{what} {path} is not a folder")
    if info.st_uid != me:
        raise BadInput(
            f"{what} {path} is owned by another user (uid {info.st_uid})",
            hint="use a folder of your own",
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BadInput(f"{what} {path} is writable by group or others", hint=f"chmod go-w {path}")


def database_url(flag: str | None) -> str | None:
    """The configured database, or None for the embedded default."""
    return flag or os.environ.get("TOWER_DATABASE_URL") or None


def read_database_url(flag: str | None) -> str | None:
    """The read replica for read-only commands (`TOWER_READ_DATABASE_URL`), or None."""
    return flag or os.environ.get("TOWER_READ_DATABASE_URL") or None


def macaroon_location() -> str:
    """The location written into macaroons and required of them (`TOWER_MACAROON_LOCATION`)."""
    return os.environ.get("TOWER_MACAROON_LOCATION") or "timmy-tower"


def _number(bound: Bound) -> float:
    """An environment number within its bound's range (exit 2 naming the range otherwise)."""
    return bound.value()


def _whole(bound: Bound) -> int:
    return int(bound.value())


@dataclass(frozen=True)
class Pricing:
    """The cost formula's parameters (SPEC 6)."""

    eval_fee_sats: int = int(bounds.EVAL_FEE_SATS.default)
    sats_per_1k_tokens: float = bounds.SATS_PER_1K_TOKENS.default
    margin: float = bounds.MARGIN.default

    @classmethod
    def from_env(cls) -> Pricing:
        return cls(
            eval_fee_sats=_whole(bounds.EVAL_FEE_SATS),
            sats_per_1k_tokens=_number(bounds.SATS_PER_1K_TOKENS),
            margin=_number(bounds.MARGIN),
        )


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on a session request, its context window and its agent (see `bounds`)."""

    max_message_chars: int = int(bounds.MESSAGE_CHARS.default)
    context_messages: int = int(bounds.CONTEXT_MESSAGES.default)
    context_tokens: int = int(bounds.CONTEXT_TOKENS.default)
    busy_wait_seconds: float = bounds.BUSY_WAIT_SECONDS.default
    agent_timeout_seconds: float = bounds.AGENT_SECONDS.default
    max_reply_chars: int = int(bounds.REPLY_CHARS.default)

    @classmethod
    def from_env(cls) -> RequestLimits:
        return cls(
            max_message_chars=_whole(bounds.MESSAGE_CHARS),
            context_messages=_whole(bounds.CONTEXT_MESSAGES),
            context_tokens=_whole(bounds.CONTEXT_TOKENS),
            busy_wait_seconds=_number(bounds.BUSY_WAIT_SECONDS),
            agent_timeout_seconds=_number(bounds.AGENT_SECONDS),
            max_reply_chars=_whole(bounds.REPLY_CHARS),
        )

    @property
    def message_stdin_bytes(self) -> int:
        return bounds.message_stdin_bytes(self.max_message_chars)

    @property
    def batch_line_bytes(self) -> int:
        return bounds.batch_line_bytes(self.max_message_chars)

    @property
    def reply_output_bytes(self) -> int:
        return bounds.reply_output_bytes(self.max_reply_chars)

    @property
    def http_body_bytes(self) -> int:
        return bounds.http_body_bytes(self.max_reply_chars)
