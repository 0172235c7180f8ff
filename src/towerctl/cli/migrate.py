"""`towerctl migrate`: apply, inspect and baseline the numbered SQL migrations."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from towerctl.cli.state import connect, note, print_json

if TYPE_CHECKING:
    from towerctl.migrations import Migration

app = typer.Typer(help="Apply the numbered SQL migrations (roll forward only).")

DIR_OPTION = typer.Option(
    None,
    "--dir",
    help="Folder of NNNN_name.sql files [env: TOWER_MIGRATIONS_DIR]. Default: the packaged ones.",
    show_default=False,
)


def _directory(path: Path | None) -> Path:
    from towerctl.migrations import default_dir

    return path if path is not None else default_dir()


@app.callback(invoke_without_command=True)
def migrate(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
    to: int | None = typer.Option(None, "--to", help="Apply pending versions up to this one."),
    allow_out_of_order: bool = typer.Option(
        False, "--allow-out-of-order", help="Apply pending files below the highest applied one."
    ),
    lock_timeout: float = typer.Option(
        60.0, "--lock-timeout", help="Seconds to wait for another runner's lock (exit 7 after)."
    ),
) -> None:
    """Apply pending migrations, each file and its ledger row in one transaction."""
    if ctx.invoked_subcommand is not None:
        return
    from towerctl import migrations

    folder = _directory(directory)
    files = migrations.discover(folder)
    conn = connect(ctx)
    if dry_run:
        plan = migrations.plan_migrations(
            files, migrations.read_ledger(conn), target=to, allow_out_of_order=allow_out_of_order
        )
        if not plan.steps:
            note("up to date: nothing to apply")
        for step in plan.steps:
            mode = "" if step.transactional else "  (no transaction)"
            sys.stdout.write(f"would apply {step.filename}{mode}\n")
        return

    def report(migration: Migration, elapsed_ms: float) -> None:
        note(f"applied {migration.filename} ({elapsed_ms:.1f} ms)")

    done = migrations.migrate(
        conn,
        folder,
        target=to,
        allow_out_of_order=allow_out_of_order,
        lock_timeout=lock_timeout,
        on_applied=report,
    )
    if not done:
        note("up to date: nothing to apply")
    else:
        note(f"applied {len(done)} migration{'s' if len(done) != 1 else ''}")


@app.command("status")
def status(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    check: bool = typer.Option(
        False, "--check", help="Exit 7 when anything is pending, changed or missing."
    ),
) -> None:
    """Show every migration and whether it is applied, pending, changed or missing."""
    from towerctl import migrations
    from towerctl.errors import MigrationError
    from towerctl.render import iso

    files = migrations.discover(_directory(directory))
    states = migrations.status(files, migrations.read_ledger(connect(ctx)))
    up_to_date = all(s.state == "applied" for s in states)
    if as_json:
        print_json(
            {
                "upToDate": up_to_date,
                "migrations": [
                    {
                        "version": s.version,
                        "name": s.name,
                        "state": s.state,
                        "checksum": s.checksum,
                        "appliedAt": s.applied_at,
                        "executionMs": None if s.execution_ms is None else round(s.execution_ms, 3),
                    }
                    for s in states
                ],
            }
        )
    else:
        for s in states:
            applied = iso(s.applied_at) or "-"
            sys.stdout.write(f"{s.version:>6}  {s.state:<8} {applied:<25} {s.name}\n")
        if not states:
            note("no migrations found")
    if check and not up_to_date:
        counts: dict[str, int] = {}
        for s in states:
            if s.state != "applied":
                counts[s.state] = counts.get(s.state, 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        only_pending = set(counts) == {"pending"}
        raise MigrationError(
            f"not up to date: {summary}",
            hint="run 'towerctl migrate'"
            if only_pending
            else "restore the applied files as they were; add changes as new migrations",
        )


@app.command("baseline")
def baseline(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    to: int = typer.Option(..., "--to", help="Record versions up to this one as applied."),
) -> None:
    """Record versions <= --to as applied without running them (schema made another way)."""
    from towerctl import migrations

    recorded = migrations.baseline(connect(ctx), _directory(directory), to)
    for m in recorded:
        note(f"recorded {m.filename} as applied (baseline)")
    note(f"baseline: {len(recorded)} version{'s' if len(recorded) != 1 else ''} recorded")
