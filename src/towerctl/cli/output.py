"""Standard output that ends quietly when the reader goes away (`| head`)."""

from __future__ import annotations

from typing import IO, Any


class StdoutClosed(Exception):
    """The reader of stdout closed the pipe. Not an OSError, so no layer mistakes it for one."""


class StdoutGuard:
    """A thin proxy over sys.stdout that turns a broken pipe into `StdoutClosed`."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise StdoutClosed() from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise StdoutClosed() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
