"""The `towerctl` program's entry point: answers `--version` before loading the parser."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, TextIO

from towerctl import __version__


def main() -> None:
    # Started with stdout or stderr closed (`>&-`, `2>&-`): Python gives no stream at all,
    # and the first write would fail before the exit code is chosen. What would have been
    # written there goes nowhere instead; the exit code still tells.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the process's own stdout)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's own stderr)
    sys.stderr = _LossyStderr(sys.stderr)
    if sys.argv[1:] == ["--version"]:
        code = version()
    else:
        from towerctl.cli import run

        code = run()
    for stream in (sys.stdout, sys.stderr):
        _flush_or_silence(stream)
    sys.exit(code)


class _LossyStderr:
    """stderr whose failed writes (a full device, an I/O error) are dropped: a diagnostic
    that cannot be written must not change the exit code the command chose."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            silence(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            silence(self._stream)

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def version() -> int:
    """Print the version: exit 0, or 10 when stdout cannot take it (a reader gone: 0)."""
    try:
        sys.stdout.write(f"towerctl {__version__}\n")
        sys.stdout.flush()
    except BrokenPipeError:
        return 0
    except OSError as error:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"towerctl: cannot write to standard output: {error.strerror}\n")
        return 10
    return 0


def _flush_or_silence(stream: TextIO | _LossyStderr) -> None:
    """Flush a standard stream; when that fails (a reader gone, a full device: `cli.run`
    has already chosen the exit code), point its descriptor at /dev/null so that the
    interpreter's own flush at exit is silent and leaves the exit code alone."""
    try:
        stream.flush()
    except Exception:
        silence(stream)


def silence(stream: Any) -> None:
    """Point the stream's descriptor at /dev/null: what is still buffered for a reader
    that is gone (or a device that is full) goes nowhere, quietly, at exit."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
