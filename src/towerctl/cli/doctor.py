"""`towerctl doctor`: check the store's invariants."""

from __future__ import annotations

import typer


def doctor(
    ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")
) -> None:
    """Check every invariant of the store; exit 9 when one does not hold."""
    raise typer.Exit(1)
