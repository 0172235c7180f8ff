"""`towerctl help [COMMAND...]`: the same help as `towerctl COMMAND... --help`."""

from __future__ import annotations

import typer

from towerctl.cli import run


def help_command(
    words: list[str] | None = typer.Argument(
        None, metavar="[COMMAND]...", help="The command to explain, e.g. session messages."
    ),
) -> None:
    """Show the help of a command (towerctl help session messages)."""
    raise typer.Exit(run([*(words or []), "--help"]))
