"""The `towerctl` program's entry point: answers `--version`, and a bare `migrate` on an
up-to-date database, before loading the parser."""

from __future__ import annotations

import gc
import sys

# Python's cyclic garbage collector runs a young-generation pass every 700 new container
# objects and, now and then, a pass over everything: while a command imports its modules
# (click, typer, psycopg: objects that live as long as the process) that was 30-45 ms of
# every start, about a tenth of an up-to-date `migrate`. Young passes every 50,000 objects
# and rare full ones free the same cycles in a long command (reference counting frees
# everything else at once).
GC_THRESHOLDS = (50_000, 20, 20)


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from towerctl import __version__

        sys.stdout.write(f"towerctl {__version__}\n")
        return
    gc.set_threshold(*GC_THRESHOLDS)
    if sys.argv[1:] == ["migrate"]:  # a deploy's call: up to date is answered without the parser
        from towerctl.quick_migrate import answered

        if answered():
            return
    from towerctl.cli import main as run_cli

    run_cli()
