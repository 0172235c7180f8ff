"""The `towerctl` program's entry point: answers `--version` before loading the parser."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from towerctl import __version__

        sys.stdout.write(f"towerctl {__version__}\n")
        return
    from towerctl.cli import main as run_cli

    run_cli()
