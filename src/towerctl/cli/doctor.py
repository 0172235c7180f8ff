"""`towerctl doctor`: check the store's invariants."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import ARGV, hide_tokens, print_json, read_connect
from towerctl.doctor import run_checks
from towerctl.errors import DatabaseUnreachable, Inconsistent


def doctor(
    ctx: typer.Context,
    as_json: bool = JSON_OPTION,
    directory: Path | None = typer.Option(
        None,
        "--dir",
        exists=True,
        file_okay=False,
        help="Migrations folder to compare with the ledger [env: TOWER_MIGRATIONS_DIR]. "
        "Default: the packaged ones.",
        show_default=False,
    ),
) -> None:
    """Check every invariant of the store; exit 9 naming what is at fault.

    Every check only reads, so with --read-database-url they run on the replica.
    """

    # Every check only reads: on the read replica when one is configured.
    checks = run_checks(read_connect(ctx), directory)
    ok = all(c.ok for c in checks)
    if as_json:
        print_json(
            {
                "ok": ok,
                "checks": [
                    {
                        "name": c.name,
                        "ok": c.ok,
                        "detail": hide_tokens(c.detail, ARGV),
                        "ran": c.ran,
                    }
                    for c in checks
                ],
            }
        )
    else:
        for c in checks:
            detail = hide_tokens(c.detail, ARGV)  # a token given as --dir is not echoed
            mark = "ok  " if c.ok else "FAIL" if c.ran else "SKIP"
            sys.stdout.write(f"{mark}  {c.name}: {detail}\n")
    failed = [c.name for c in checks if not c.ok and c.ran]
    if failed:
        raise Inconsistent(f"{len(failed)} check(s) failed: {', '.join(failed)}")
    not_run = [c.name for c in checks if not c.ran]
    if not_run:
        # A check that could not run found nothing: exit 8, never an inconsistency.
        raise DatabaseUnreachable(
            f"{len(not_run)} check(s) could not run: {', '.join(not_run)}",
            hint="see each check's detail; retry, or grant the role what it lacks",
        )
