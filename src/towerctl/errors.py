"""Exit codes of the contract and the exceptions that carry them.

Services raise these; the CLI turns each into one line on stderr and its code.
Messages must never contain secrets (root key, macaroons, passwords).
"""

from __future__ import annotations

import errno
import os
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    UNAUTHORIZED = 3
    NOT_FOUND = 4
    NOT_SERVED = 5
    AGENT_FAILED = 6
    MIGRATION = 7
    UNREACHABLE = 8
    INCONSISTENT = 9
    WRITE_FAILED = 10


class TowerError(Exception):
    """Base of every expected failure; `str()` is the one line shown to the user."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadInput(TowerError):
    exit_code = ExitCode.BAD_INPUT


class Unauthorized(TowerError):
    exit_code = ExitCode.UNAUTHORIZED


class NotFound(TowerError):
    exit_code = ExitCode.NOT_FOUND


class NotServed(TowerError):
    exit_code = ExitCode.NOT_SERVED


class AgentFailed(TowerError):
    exit_code = ExitCode.AGENT_FAILED


class MigrationError(TowerError):
    exit_code = ExitCode.MIGRATION


class DatabaseUnreachable(TowerError):
    exit_code = ExitCode.UNREACHABLE


class Inconsistent(TowerError):
    exit_code = ExitCode.INCONSISTENT


class WriteFailed(TowerError):
    """The output could not be written (disk full, device error, a batch's reader gone)."""

    exit_code = ExitCode.WRITE_FAILED


def error_for(code: ExitCode, message: str) -> TowerError:
    """The error class that carries `code` (for outcomes that combine several, like a batch)."""
    for kind in (BadInput, Unauthorized, NotFound, NotServed, AgentFailed, MigrationError,
                 DatabaseUnreachable, Inconsistent, WriteFailed):  # fmt: skip
        if kind.exit_code == code:
            return kind(message)
    return TowerError(message)


# A path the user gave (--dir, TOWER_HOME, a key file...) that the system will not open
# for them: too long, not theirs to read, a loop of links, a file where a folder should be.
UNOPENABLE_PATH_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR}
)
SHOWN_PATH_CHARS = 80


def unopenable_path(error: BaseException) -> BadInput | None:
    """Exit 2 for an OSError naming a path that cannot be opened, else None."""
    if not isinstance(error, OSError) or error.errno not in UNOPENABLE_PATH_ERRNOS:
        return None
    if error.filename is None:
        return None
    path = os.fsdecode(error.filename)
    if len(path) > SHOWN_PATH_CHARS:  # a name too long for the system is too long to show
        half = SHOWN_PATH_CHARS // 2
        path = f"{path[:half]}…{path[-half:]} ({len(path)} characters)"
    return BadInput(f"cannot open {path}: {error.strerror}")
