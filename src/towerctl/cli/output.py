"""Standard output that ends quietly when the reader goes away (`| head`)."""

from __future__ import annotations

from typing import IO, Any


class StdoutClosed(Exception):
    """The reader of stdout closed the pipe. Not an OSError, so no layer mistakes it for one."""


class PipeGuard:
    """A thin proxy over stdout (text or its binary buffer) that turns a broken pipe
    into `StdoutClosed`."""

    def __init__(self, stream: IO[Any]) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        try:
            return int(self._stream.write(data))
        except BrokenPipeError:
            raise StdoutClosed() from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise StdoutClosed() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class TextSink:
    """Bytes written to a text stream (stdout captured as text, e.g. in tests)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self._stream.write(bytes(data).decode("utf-8"))

    def flush(self) -> None:
        self._stream.flush()


def binary_stdout() -> PipeGuard | TextSink:
    import sys

    stream = sys.stdout
    raw = getattr(stream, "_stream", stream)  # unwrap the text guard
    buffer = getattr(raw, "buffer", None)
    if buffer is not None:
        stream.flush()
        return PipeGuard(buffer)
    return TextSink(stream)


class atomic_file:
    """Write to a temporary file beside `path`; rename over `path` only on success.

    A failed or interrupted export never leaves a half file under the final name.
    The file is created 0600: transcripts are private.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> IO[bytes]:
        import os
        import tempfile

        from towerctl.errors import BadInput

        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, self.temp = tempfile.mkstemp(
                prefix=f".{os.path.basename(self.path)}.", suffix=".part", dir=folder
            )
        except OSError as error:
            raise BadInput(f"cannot write in {folder}: {error.strerror}") from None
        self.handle = os.fdopen(fd, "wb")
        return self.handle

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        import os

        try:
            if kind is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if kind is None:
                try:
                    os.replace(self.temp, self.path)
                except OSError as error:
                    from towerctl.errors import BadInput

                    raise BadInput(f"cannot write {self.path}: {error.strerror}") from None
        finally:
            if os.path.exists(self.temp):
                os.unlink(self.temp)
