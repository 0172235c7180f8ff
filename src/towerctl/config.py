"""Settings read from the environment, each in one place with its default.

Precedence for every setting: command-line flag (handled by the CLI), then the
environment variable named here, then the default.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

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


def macaroon_location() -> str:
    """The location written into macaroons and required of them (`TOWER_MACAROON_LOCATION`)."""
    return os.environ.get("TOWER_MACAROON_LOCATION") or "timmy-tower"


def _number(name: str, default: float, *, minimum: float = 0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum or value != value or value in (float("inf"), float("-inf")):
        raise BadInput(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _whole(name: str, default: int, *, minimum: int = 0) -> int:
    value = _number(name, default, minimum=minimum)
    if value != int(value):
        raise BadInput(f"{name} must be a whole number, got {os.environ.get(name)!r}")
    return int(value)


@dataclass(frozen=True)
class Pricing:
    """The cost formula's parameters (SPEC 6)."""

    eval_fee_sats: int = 10
    sats_per_1k_tokens: float = 100.0
    margin: float = 1.4

    @classmethod
    def from_env(cls) -> Pricing:
        return cls(
            eval_fee_sats=_whole("TOWER_EVAL_FEE_SATS", 10),
            sats_per_1k_tokens=_number("TOWER_SATS_PER_1K_TOKENS", 100.0),
            margin=_number("TOWER_MARGIN", 1.4),
        )


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on a session request and its context window."""

    max_message_chars: int = 32_000
    context_messages: int = 8
    context_tokens: int = 4_000
    busy_wait_seconds: float = 30.0
    agent_timeout_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> RequestLimits:
        return cls(
            max_message_chars=_whole("TOWER_MAX_MESSAGE_CHARS", 32_000, minimum=1),
            context_messages=_whole("TOWER_CONTEXT_MESSAGES", 8),
            context_tokens=_whole("TOWER_CONTEXT_TOKENS", 4_000),
            busy_wait_seconds=_number("TOWER_BUSY_WAIT", 30.0),
            agent_timeout_seconds=_number("TOWER_AGENT_TIMEOUT", 60.0, minimum=0.001),
        )
