"""`towerctl doctor`: check the store's invariants."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import connect, print_json


def doctor(
    ctx: typer.Context,
    as_json: bool = JSON_OPTION,
    directory: Path | None = typer.Option(
        None,
        "--dir",
        help="Migrations folder to compare with the ledger [env: TOWER_MIGRATIONS_DIR]. "
        "Default: the packaged ones.",
        show_default=False,
    ),
) -> None:
    """Check every invariant of the store; exit 9 naming what is at fault."""
    from towerctl.doctor import run_checks
    from towerctl.errors import Inconsistent

    checks = run_checks(connect(ctx), directory)
    ok = all(c.ok for c in checks)
    if as_json:
        print_json(
            {"ok": ok, "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]}
        )
    else:
        for c in checks:
            sys.stdout.write(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}\n")
    if not ok:
        failed = [c.name for c in checks if not c.ok]
        raise Inconsistent(f"{len(failed)} check(s) failed: {', '.join(failed)}")
