"""One progress display for long work: on stderr, for people only.

Shown when stderr is a terminal (and, where the data itself goes to stdout, stdout
is not that terminal's screen to share) and `NO_COLOR` is unset; otherwise the
work runs without it. Migrations, batches, exports to a file and purges use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Update = Callable[[int, "int | None"], None]  # (done, total or None when unknown)


def wanted(*, stdout_free: bool = False) -> bool:
    """Whether a person watches stderr: a terminal, no NO_COLOR (and, with `stdout_free`,
    stdout is not a terminal too, where the data itself shows the progress)."""
    if not sys.stderr.isatty() or os.environ.get("NO_COLOR"):
        return False
    return not (stdout_free and sys.stdout.isatty())


@contextmanager
def progress(label: str, *, stdout_free: bool = False) -> Iterator[Update | None]:
    """A transient rich progress display labelled `label`, or None when nobody watches."""
    if not wanted(stdout_free=stdout_free):
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    # stdout is data and must never pass through the display; stderr lines (notes)
    # are printed above it.
    with Progress(console=Console(file=sys.stderr), transient=True, redirect_stdout=False) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update
