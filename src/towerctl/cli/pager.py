"""Long output on a terminal goes through a pager, as git and gh do (SPEC 17).

The pager is `TOWER_PAGER`, else `PAGER`, else `less -FRX` (`-F`: output that fits
one screen is printed and less exits at once; `-R`: colours pass; `-X`: the
screen is not cleared). An empty value or `cat` means none; `--no-pager`, a pipe
or a file on stdout bypass it. While it runs, towerctl's standard output is the
pager's input: a reader who quits early (`q`) is a reader gone, which ends the
command quietly with exit 0, and towerctl waits for the pager before it exits, so
nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

DEFAULT = "less -FRX"


def pager_command() -> list[str] | None:
    """The pager to run, or None (none configured, `cat`, or not installed)."""
    for name in ("TOWER_PAGER", "PAGER"):
        if name in os.environ:
            chosen = os.environ[name]
            break
    else:
        chosen = DEFAULT
    try:
        words = shlex.split(chosen)
    except ValueError:
        return None
    if not words or words[0] == "cat" or shutil.which(words[0]) is None:
        return None
    return words


@contextlib.contextmanager
def paged(enabled: bool = True) -> Iterator[bool]:
    """Inside, standard output goes to the pager when it is a terminal and paging is
    enabled; yields whether it does (the caller chose its colours before)."""
    command = pager_command() if enabled else None
    if command is None or not _stdout_is_terminal():
        yield False
        return
    env = dict(os.environ)
    env.setdefault("LESS", "FRX")
    env.setdefault("LV", "-c")
    sys.stdout.flush()
    try:
        pager = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
    except OSError:
        yield False
        return
    assert pager.stdin is not None
    saved = os.dup(1)
    os.dup2(pager.stdin.fileno(), 1)
    pager.stdin.close()
    # The pager owns the terminal's keys: Ctrl-C is its own (less stops a search); q ends
    # it, and the next write of towerctl finds its reader gone.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield True
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
    finally:
        os.dup2(saved, 1)  # the pipe's last write end closes: the pager sees the end
        os.close(saved)
        pager.wait()
        signal.signal(signal.SIGINT, previous)


def _stdout_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return False
