"""Running towerctl on a real pseudo-terminal, and what reached it.

A pipe is not a terminal: rich, `isatty` checks and line disciplines behave
differently. These helpers start towerctl with stdin, stdout and stderr on the
slave side of a pty and collect every byte that reached the master side.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

TOWERCTL = (sys.executable, "-m", "towerctl")


@dataclass(frozen=True)
class Screen:
    exit_code: int
    text: str  # what reached the terminal, stdout and stderr together, decoded


def read_pty(
    master: int,
    timeout: float,
    *,
    until: Callable[[bytes], bool] | None = None,
    proc: subprocess.Popen[bytes] | None = None,
) -> bytes:
    """Every byte from a pty's master side until its slave side is closed everywhere (EIO),
    `until(data so far)` holds, `proc` has exited with nothing left to read, or `timeout`
    seconds have passed (the caller judges which: this only reads)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (until is not None and until(data)):
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed
                break
            if not chunk:
                break
            data += chunk
        elif proc is not None and proc.poll() is not None:
            break
    return data


def run_on_pty(
    args: Sequence[str],
    env: dict[str, str],
    timeout: float = 60,
    stdin_text: str = "",
    *,
    columns: int = 120,
    stdin_closed: bool = False,
) -> Screen:
    """towerctl `args` with stdout and stderr (and stdin, unless `stdin_closed`: then
    /dev/null) on a pty; fails the test if it has not finished within `timeout` seconds."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [*TOWERCTL, *args],
            env={**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": "40"},
            stdin=subprocess.DEVNULL if stdin_closed else slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    if stdin_text:
        os.write(master, stdin_text.encode())
    deadline = time.monotonic() + timeout
    try:
        shown = read_pty(master, timeout, proc=proc)
        if time.monotonic() >= deadline and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
            raise AssertionError(f"towerctl {args[:3]} did not finish on the pty in {timeout}s")
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
    return Screen(code, shown.decode("utf-8", errors="replace"))


def raw_hidden(text: str) -> list[str]:
    """Hidden characters that reached the screen raw, apart from the terminal's own line
    endings (`\\r\\n`, which the pty's output processing makes of every `\\n`) and tabs."""
    found = []
    for i, ch in enumerate(text):
        if ch in "\n\t":
            continue
        if ch == "\r" and text[i + 1 : i + 2] == "\n":
            continue
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            found.append(f"U+{ord(ch):04X}")
    return found


@dataclass(frozen=True)
class Emulated:
    """What a person would see: the screen a terminal emulator (pyte) drew from the bytes."""

    lines: list[str]  # each row of the screen, trailing blanks removed
    title: str  # the window title, which outside text must never set
    colored: set[str]  # foreground colours drawn anywhere (besides "default")
    bold_cells: int

    @property
    def text(self) -> str:
        return "\n".join(self.lines).strip("\n")

    def row_with(self, words: str) -> str:
        """The one screen row holding `words`; fails the test if there is none."""
        rows = [line for line in self.lines if words in line]
        assert rows, f"{words!r} is not on the screen:\n{self.text}"
        return rows[0]


def emulate(data: bytes, columns: int = 120, rows: int = 400) -> Emulated:
    """Feed `data` (as a pty delivered it) to a terminal emulator and read its screen."""
    import pyte

    screen = pyte.Screen(columns, rows)
    stream = pyte.ByteStream(screen)
    stream.feed(data)
    colored, bold = set(), 0
    for y in range(rows):
        line = screen.buffer[y]
        for x in range(columns):
            cell = line[x]
            if cell.fg != "default":
                colored.add(cell.fg)
            bold += cell.bold
    return Emulated([row.rstrip() for row in screen.display], screen.title, colored, bold)


def run_on_screen(
    args: Sequence[str], env: dict[str, str], *, columns: int = 120, timeout: float = 60
) -> tuple[int, Emulated]:
    """towerctl `args` on a pty, and the screen a terminal would show afterwards."""
    done = run_on_pty(args, env, timeout, columns=columns, stdin_closed=True)
    return done.exit_code, emulate(done.text.encode("utf-8"), columns)


@contextlib.contextmanager
def on_pty(
    args: Sequence[str], env: dict[str, str], *, stdin_closed: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """towerctl `args` under way with stdout and stderr (and stdin, unless `stdin_closed`:
    then /dev/null) on a pty: (the process, the pty's master side), for the caller to read
    and answer. On the way out a process still running is killed and waited for, and the
    master side is closed, whatever the test found."""
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [*TOWERCTL, *args], env=env, stdin=subprocess.DEVNULL if stdin_closed else slave,
            stdout=slave, stderr=slave, start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(slave)
    try:
        yield proc, master
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)
