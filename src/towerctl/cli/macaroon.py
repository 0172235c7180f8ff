"""`towerctl macaroon`."""

from __future__ import annotations

import typer

app = typer.Typer(help="macaroon commands.", no_args_is_help=True)
