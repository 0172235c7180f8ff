"""Files named by `-o`: written atomically (temporary file beside the target, fsync,
rename), never through a symbolic link another user controls, with stale `.part`
files of killed runs removed. A failed write is exit 10; the target stays as it was.
Standard output, standard error and devices named by `-o` are written as streams.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from contextlib import suppress
from dataclasses import dataclass

from towerctl.cli.output import write_all
from towerctl.errors import BadInput, WriteFailed

SYMLINK_HOPS = 40  # as the kernel's own limit


@dataclass(frozen=True)
class Output:
    """Where `-o` writes: a regular file (`path`, replaced atomically) or a stream (`fd`:
    standard output or error, another open descriptor, a character device or a FIFO),
    written as it is, as shell redirection would, so a `>>` log keeps its lines."""

    path: str | None = None
    fd: int | None = None
    opened: bool = False  # `fd` was opened here (a device or FIFO): close it when done

    def close(self) -> None:
        if self.opened and self.fd is not None:
            with suppress(OSError):
                os.close(self.fd)


STDOUT = Output(fd=1)
# A descriptor of this process, however it is named: /dev/stdout and /dev/fd/N lead here.
_OWN_DESCRIPTOR = re.compile(rf"/proc/(?:self|thread-self|{os.getpid()})/fd/(\d+)")


def resolve_output(name: str) -> Output:
    """What `-o NAME` names, or BadInput (exit 2).

    Symbolic links on the way are followed only when owned by the user or by root: a
    link planted by another user (say in a sticky /tmp) is refused. A name that leads to
    one of this process's descriptors (`/dev/stdout`, `/dev/stderr`, `/proc/self/fd/N`)
    is that descriptor, never the file behind it; a character device or FIFO is opened
    and written as a stream; anything else must be a regular file (new or existing) in a
    folder that exists.
    """
    if not name:
        raise BadInput("-o needs a file name")
    if name == "-":
        return STDOUT
    found = _resolve_trusted(name, os.path.join(os.getcwd(), name))
    if found.fd is not None:
        return found
    path = found.path
    assert path is not None
    if os.path.isdir(path):
        raise BadInput(f"-o {name!r} is a folder, not a file name")
    if os.path.lexists(path) and not os.path.isfile(path):
        return _open_stream(name, path)
    if not os.path.isdir(os.path.dirname(path)):
        raise BadInput(f"-o {name}: the folder does not exist")
    return Output(path=path)


def _open_stream(name: str, path: str) -> Output:
    """A character device or FIFO, opened for writing as it is (no truncation, no rename)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise BadInput(f"-o {name}: {error.strerror}") from None
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)):
        raise BadInput(f"-o {name}: not a regular file, character device or FIFO")
    try:
        return Output(fd=os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC), opened=True)
    except OSError as error:
        kind = WriteFailed if error.errno == errno.EROFS else BadInput
        raise kind(f"-o {name}: cannot open: {error.strerror}") from None


def _descriptor(name: str, number: str) -> Output:
    fd = int(number)
    try:
        os.fstat(fd)
    except (OSError, OverflowError):
        raise BadInput(f"-o {name}: descriptor {number} is not open") from None
    return Output(fd=fd)


def _resolve_trusted(name: str, path: str) -> Output:
    trusted = {0, os.geteuid()}
    pending = [part for part in path.split("/") if part]
    resolved, hops = "/", 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        own = _OWN_DESCRIPTOR.fullmatch(candidate)
        if own and not pending:
            return _descriptor(name, own.group(1))
        try:
            info = os.lstat(candidate)
        except OSError:
            resolved = candidate  # a new name (or an unreadable one: later checks refuse)
            continue
        if not stat.S_ISLNK(info.st_mode):
            resolved = candidate
            continue
        if info.st_uid not in trusted:
            raise BadInput(
                f"-o {name}: {candidate} is a symbolic link owned by another user; "
                "refusing to write through it"
            )
        hops += 1
        if hops > SYMLINK_HOPS:
            raise BadInput(f"-o {name}: too many symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        pending = [p for p in target.split("/") if p] + pending
    return Output(path=resolved)


def remove_stale_parts(path: str) -> list[str]:
    """Remove temporary files that an earlier export to `path` left when it was killed
    (SIGKILL, power loss): `.<name>.<pid>.<random>.part` beside it, owned by this user,
    a regular file, and whose pid is no running process. Returns the names removed."""
    folder, name = os.path.split(path)
    prefix, removed = f".{name}.", list[str]()
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not (entry.startswith(prefix) and entry.endswith(".part")):
            continue
        pid_text = entry[len(prefix) : -len(".part")].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        full = os.path.join(folder, entry)
        try:
            info = os.lstat(full)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            continue
        if _process_exists(int(pid_text)):
            continue
        try:
            os.unlink(full)
            removed.append(entry)
        except OSError:
            pass
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class FileSink:
    """Bytes to an open file; any failed write is `WriteFailed` naming the target."""

    def __init__(self, fd: int, shown: str) -> None:
        self.fd, self.shown = fd, shown

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return write_all(self.fd, data)
        except OSError as error:
            raise WriteFailed(f"cannot write {self.shown}: {error.strerror or error}") from None

    def isatty(self) -> bool:
        return False


class atomic_file:
    """Write to a temporary file beside `path`; fsync and rename over `path` only on success.

    The temporary file is `.<name>.<pid>.<random>.part`, created 0600 (transcripts are
    private) with O_EXCL, so it is never a link. On any failure or interruption it is
    removed and an existing `path` stays byte-identical. `os.replace` replaces the
    directory entry itself: it never follows a link. Leftovers of a killed export are
    removed by the next export to the same path (`remove_stale_parts`).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.temp: str | None = None
        self.fd: int | None = None

    def __enter__(self) -> FileSink:
        folder, name = os.path.split(self.path)
        remove_stale_parts(self.path)
        try:
            self.fd, self.temp = tempfile.mkstemp(
                prefix=f".{name}.{os.getpid()}.", suffix=".part", dir=folder
            )
        except OSError as error:
            # A read-only file system cannot take the output: exit 10, not a usage error.
            kind = WriteFailed if error.errno == errno.EROFS else BadInput
            raise kind(f"cannot write in {folder}: {error.strerror}") from None
        return FileSink(self.fd, self.path)

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        assert self.fd is not None and self.temp is not None
        try:
            if kind is None:
                try:
                    os.fsync(self.fd)
                    os.close(self.fd)
                    self.fd = None
                    os.replace(self.temp, self.path)
                    self.temp = None
                except OSError as failure:
                    raise WriteFailed(
                        f"cannot write {self.path}: {failure.strerror or failure}"
                    ) from None
                _fsync_folder(os.path.dirname(self.path))
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if self.temp is not None:
                with suppress(FileNotFoundError):
                    os.unlink(self.temp)
                self.temp = None


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
