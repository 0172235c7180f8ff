"""`towerctl doctor`: check the store's invariants."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import ARGV, connect, hide_tokens, print_json, read_connect
from towerctl.doctor import examine
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
    full: bool = typer.Option(
        False,
        "--full",
        help="Check every session, not only those changed since the last clean run.",
    ),
) -> None:
    """Check the store's invariants; exit 9 naming what is at fault.

    By default only the sessions changed since the last clean run are checked (the
    watermarks are kept in the store); --full checks them all. A check that could not
    run is "not run", exit 8. Every check only reads, so with --read-database-url they
    run on the replica; the watermarks are written to the primary.
    """

    # Every check only reads: on the read replica when one is configured.
    run = examine(read_connect(ctx), lambda: connect(ctx), directory, full=full)
    checks = run.checks
    ok = all(c.ok for c in checks)
    if as_json:
        print_json(
            {
                "ok": ok,
                "full": run.full,
                "sessionsChecked": run.sessions,
                "watermarksRecorded": run.recorded,
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
        sys.stdout.write(f"{_scope_line(run.full, run.sessions)}\n")
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


def _scope_line(full: bool, sessions: int | None) -> str:
    if full:
        return "checked every session"
    return f"checked {sessions} session(s) changed since the last clean run (--full: all)"
