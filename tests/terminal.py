"""Running towerctl on a real pseudo-terminal, and what reached it.

A pipe is not a terminal: rich, `isatty` checks and line disciplines behave
differently. These helpers start towerctl with stdin, stdout and stderr on the
slave side of a pty and collect every byte that reached the master side.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

TOWERCTL = (sys.executable, "-m", "towerctl")


@dataclass(frozen=True)
class Screen:
    exit_code: int
    text: str  # what reached the terminal, stdout and stderr together, decoded


def run_on_pty(
    args: Sequence[str], env: dict[str, str], timeout: float = 60, stdin_text: str = ""
) -> Screen:
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [*TOWERCTL, *args],
            env={**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            close_fds=True,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    if stdin_text:
        os.write(master, stdin_text.encode())
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise AssertionError(f"towerctl {args[:3]} did not finish on the pty in {timeout}s")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every slave end is closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
    return Screen(code, b"".join(chunks).decode("utf-8", errors="replace"))


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
