"""Standard output that ends quietly when the reader goes away (`| head`), and
failed writes turned into exit 10. Files named by `-o` are in `cli/outfile.py`.

- A reader gone (EPIPE on stdout) raises `StdoutClosed`: the CLI exits 0 at once.
- Any other failed write (ENOSPC, EIO, and EPIPE on a file) raises `WriteFailed` (exit 10).
- After either, stdout is pointed at /dev/null so that nothing buffered is retried at exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO, Any

from towerctl.console import silence
from towerctl.errors import WriteFailed


class StdoutClosed(Exception):
    """The reader of stdout closed the pipe. Not an OSError, so no layer mistakes it for one."""


class Terminated(KeyboardInterrupt):
    """A signal that would end the process (SIGTERM, SIGHUP...), raised like
    KeyboardInterrupt so that the same clean-up runs; the exit code is 128 + its number."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _terminating_signals() -> tuple[int, ...]:
    """The catchable signals whose default action ends the process (signal(7): Term or
    Core). SIGINT is Python's (KeyboardInterrupt, exit 130). Left out: the faults a
    program raises on itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT),
    which a handler cannot recover from, and SIGPIPE and SIGXFSZ, which Python ignores
    (the write fails instead: EPIPE, EFBIG)."""
    names = ("SIGHUP", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
             "SIGPROF", "SIGXCPU", "SIGIO", "SIGPWR", "SIGSTKFLT")  # fmt: skip
    named = {int(getattr(signal, n)) for n in names if hasattr(signal, n)}
    realtime = range(signal.SIGRTMIN, signal.SIGRTMAX + 1) if hasattr(signal, "SIGRTMIN") else ()
    return tuple(sorted(named.union(realtime)))


TERMINATING_SIGNALS = _terminating_signals()


def _write_error(stream: Any, error: OSError) -> Exception:
    silence(stream)
    if isinstance(error, BrokenPipeError):
        return StdoutClosed()
    return WriteFailed(f"cannot write to standard output: {error.strerror or error}")


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Every byte of `data` to `fd` (os.write may take part of it); OSError as it comes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)


class PipeGuard:
    """A thin proxy over stdout (text or its binary buffer): a broken pipe becomes
    `StdoutClosed`, any other failed write `WriteFailed`."""

    def __init__(self, stream: IO[Any]) -> None:
        self._stream = stream
        self.written = False  # whether the command has printed anything yet

    def write(self, data: Any) -> int:
        if isinstance(data, str) and not data:
            # Nothing to write (Click probes streams so): a stream that cannot take a
            # write says so when there is something to write, not in a probe that
            # swallows the error.
            return 0
        self.written = self.written or bool(data)
        try:
            return int(self._stream.write(data))
        except OSError as error:
            raise _write_error(self._stream, error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise _write_error(self._stream, error) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class FdSink:
    """Bytes straight to a file descriptor, unbuffered (callers write large blocks), so
    nothing is left in a buffer when the reader goes away or the device is full."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return write_all(self.fd, data)
        except OSError as error:
            raise _write_error(self, error) from None

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return os.isatty(self.fd)


class TextSink:
    """Bytes written to a text stream (stdout captured as text, e.g. in tests)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._stream.write(bytes(data).decode("utf-8"))

    def isatty(self) -> bool:
        return bool(self._stream.isatty())


def binary_stdout(fd: int = 1) -> FdSink | TextSink:
    """Stdout (or stderr, or another open descriptor) for bytes: its file descriptor when
    it has one, after flushing the text layers written so far."""
    texts = {1: sys.stdout, 2: sys.stderr}
    for text in texts.values():
        text.flush()
    stream = texts.get(fd)
    if stream is None:
        return FdSink(fd)
    try:
        return FdSink(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return TextSink(stream)


@contextmanager
def signals_raise(signals: tuple[int, ...] = TERMINATING_SIGNALS) -> Iterator[None]:
    """While inside, each of `signals` whose action is still the default (not one the
    caller ignores, as `nohup` ignores SIGHUP) raises `Terminated`, like Ctrl-C raises
    KeyboardInterrupt, so the work in hand cleans up before the process ends."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    try:
        for signum in signals:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for signum, action in previous.items():
            signal.signal(signum, action)


def sigterm_raises() -> contextlib.AbstractContextManager[None]:
    """While inside, SIGTERM raises `Terminated` (like Ctrl-C raises KeyboardInterrupt)."""
    return signals_raise((signal.SIGTERM,))


# --- -o FILE ---------------------------------------------------------------------
