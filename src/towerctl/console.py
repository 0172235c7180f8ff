"""The `towerctl` program's entry point: answers `--version`, and a bare `migrate` on an
up-to-date database, before loading the parser."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import NoReturn

# Python's cyclic garbage collector runs a young-generation pass every 700 new container
# objects and, now and then, a pass over everything: while a command imports its modules
# (click, typer, psycopg: objects that live as long as the process) that was 30-45 ms of
# every start, about a tenth of an up-to-date `migrate`. Young passes every 50,000 objects
# and rare full ones free the same cycles in a long command (reference counting frees
# everything else at once).
GC_THRESHOLDS = (50_000, 20, 20)


def main() -> None:
    # Started with stdout or stderr closed (`>&-`, `2>&-`): Python gives no stream at all,
    # and the first write would fail before the exit code is chosen. What would have been
    # written there goes nowhere instead; the exit code still tells.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the process's own stdout)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's own stderr)
    if sys.argv[1:] == ["--version"]:
        leave(version())
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        # a deploy's call: up to date is answered without the parser
        if sys.argv[1:] == ["migrate"]:
            from towerctl.quick_migrate import answered

            if answered():
                raise SystemExit(0)
        from towerctl.cli import main as run_cli

        run_cli()
    except SystemExit as done:
        leave(done.code)
    leave(0)


def version() -> int:
    """Print the version: exit 0, or 10 when stdout cannot take it (a reader gone: 0)."""
    from towerctl import __version__

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


def leave(code: object) -> NoReturn:
    """End the process once the command is done: flush what it wrote, then exit without the
    interpreter's teardown. That teardown (every module's objects freed, the collector run
    over all of them) cost 120-220 ms of every command on the reference machine, a sixth of
    a 1,000-line batch, and does nothing towerctl needs: every command has closed its
    connections, files and children before it returns (`cli.run` catches everything, so
    their `finally` blocks have run), and its only thread is a daemon."""
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): said on stderr, exit 1
        if sys.stderr is not None:
            with contextlib.suppress(Exception):
                sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        # None: started with that descriptor closed. A reader gone or a full device:
        # `cli.run` has already chosen the exit code.
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()
    os._exit(code)
