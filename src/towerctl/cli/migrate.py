"""`towerctl migrate`: apply, inspect, baseline, create and repair the numbered SQL migrations."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from towerctl import migrations
from towerctl.cli.findings import summary as findings_summary
from towerctl.cli.findings import warn_findings, write_findings
from towerctl.cli.params import JSON_OPTION, whole_number
from towerctl.cli.progress import progress
from towerctl.cli.state import connect, note, print_json
from towerctl.errors import BadInput, MigrationError
from towerctl.migrations import default_dir
from towerctl.render import iso
from towerctl.sanitize import for_terminal

if TYPE_CHECKING:
    from towerctl.migrations import Finding, Migration

app = typer.Typer(help="Apply the numbered SQL migrations (roll forward only).")

DIR_OPTION = typer.Option(
    None,
    "--dir",
    help="Folder of NNNN_name.sql files [env: TOWER_MIGRATIONS_DIR]. Default: the packaged ones.",
    show_default=False,
)
VERSION = whole_number(0, 2**63 - 1)  # ASCII digits within PostgreSQL's bigint
LOCK_TIMEOUT_HELP = (
    "Seconds to wait for another towerctl migrate to finish (exit 7 after). The wait of "
    "each statement for a table lock is TOWER_MIGRATION_LOCK_TIMEOUT."
)


@dataclass(frozen=True)
class GroupOptions:
    """Options given to `migrate` before a subcommand; they apply to it."""

    directory: Path | None
    dry_run: bool
    to: int | None
    allow_out_of_order: bool
    lock_timeout: float | None


def _group(ctx: typer.Context) -> GroupOptions:
    found = ctx.meta.get("towerctl.migrate")  # meta is shared by a context and its children
    if isinstance(found, GroupOptions):
        return found
    return GroupOptions(None, False, None, False, None)


def _directory(ctx: typer.Context, path: Path | None) -> Path:
    if path is not None:
        return path
    given = _group(ctx).directory
    return given if given is not None else default_dir()


def _lock_timeout(ctx: typer.Context, value: float | None) -> float:
    if value is not None:
        return value
    given = _group(ctx).lock_timeout
    return given if given is not None else 60.0


def _refuse_group_options(ctx: typer.Context, command: str, *, to_applies: bool = False) -> None:
    group = _group(ctx)
    given = [
        flag
        for flag, value in (
            ("--dry-run", group.dry_run),
            ("--allow-out-of-order", group.allow_out_of_order),
            ("--to", group.to is not None and not to_applies),
        )
        if value
    ]
    if given:
        raise BadInput(f"{', '.join(given)} does not apply to 'migrate {command}'")


@app.callback(invoke_without_command=True)
def migrate(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Make every check, print the plan; change nothing."
    ),
    to: int | None = typer.Option(
        None,
        "--to",
        metavar="VERSION",
        parser=VERSION,
        help="Apply pending versions up to this one.",
    ),
    allow_out_of_order: bool = typer.Option(
        False, "--allow-out-of-order", help="Apply pending files below the highest applied one."
    ),
    lock_timeout: float | None = typer.Option(
        None, "--lock-timeout", help=LOCK_TIMEOUT_HELP + " [default: 60]", show_default=False
    ),
) -> None:
    """Apply pending migrations, each file and its ledger row in one transaction."""
    ctx.meta["towerctl.migrate"] = GroupOptions(
        directory, dry_run, to, allow_out_of_order, lock_timeout
    )
    if ctx.invoked_subcommand is not None:
        return

    folder = _directory(ctx, directory)
    wait = lock_timeout if lock_timeout is not None else 60.0
    if to is not None:
        migrations.check_version(to, "--to")
    conn = connect(ctx)
    if dry_run:
        steps = migrations.dry_run(conn, folder, target=to, allow_out_of_order=allow_out_of_order)
        if not steps:
            note("up to date: nothing to apply")
        for line in migrations.describe_plan(steps):
            sys.stdout.write(line + "\n")
        warn_findings(migrations.lint_steps(conn, steps))
        return

    applied: list[Migration] = []
    with progress("applying migrations") as shown:

        def report(migration: Migration, elapsed_ms: float) -> None:
            note(f"applied {migration.filename} ({elapsed_ms:.1f} ms)")
            applied.append(migration)
            if shown is not None:
                shown(len(applied), None)

        done = migrations.migrate(
            conn,
            folder,
            target=to,
            allow_out_of_order=allow_out_of_order,
            lock_timeout=wait,
            on_applied=report,
            notify=note,
        )
    if not done:
        note("up to date: nothing to apply")
    else:
        note(f"applied {len(done)} migration{'s' if len(done) != 1 else ''}")


@app.command("status")
def status(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    as_json: bool = JSON_OPTION,
    check: bool = typer.Option(
        False, "--check", help="Exit 7 when anything is pending, changed, missing or duplicate."
    ),
) -> None:
    """Show every migration and whether it is applied, pending, changed, missing or duplicate."""

    _refuse_group_options(ctx, "status")
    folder = _directory(ctx, directory)
    files = migrations.discover(folder)
    states = migrations.status(files, migrations.read_ledger(connect(ctx)))
    up_to_date = all(s.state == "applied" for s in states)
    found = _pending_findings(ctx, folder, states)
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
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
                        "baseline": s.baseline,
                        "fileChecksum": s.file_checksum,
                    }
                    | _lint_counts(found, s.version)
                    for s in states
                ],
            }
        )
    else:
        sys.stdout.write(f"{'VERSION':>7}  {'STATE':<9} {'APPLIED AT':<25} NAME\n")
        for s in states:
            applied = iso(s.applied_at) or "-"
            mark = "  (baseline)" if s.baseline else ""
            counts_of = _lint_counts(found, s.version)
            if counts_of:
                mark += f"  (lint: {counts_of['lintFindings']}, "
                mark += f"{counts_of['lintAccepted']} accepted)"
            name = for_terminal(s.filename or s.name)
            sys.stdout.write(f"{s.version:>7}  {s.state:<9} {applied:<25} {name}{mark}\n")
        order = ("applied", "pending", "changed", "missing", "duplicate")
        summary = ", ".join(f"{counts[k]} {k}" for k in order if k in counts)
        total = len(states)
        sys.stdout.write(
            f"{total} migration{'s' if total != 1 else ''}"
            + (f": {summary}" if summary else "")
            + (" (up to date)" if up_to_date and states else "")
            + "\n"
        )
        if found:
            sys.stdout.write(f"lint of the pending files: {findings_summary(found)}\n")
    if check and not up_to_date:
        bad = {k: v for k, v in counts.items() if k != "applied"}
        summary = ", ".join(f"{n} {state}" for state, n in sorted(bad.items()))
        if found:
            summary += f"; lint: {findings_summary(found)}"
        raise MigrationError(
            f"not up to date: {summary}",
            hint="run 'towerctl migrate'"
            if set(bad) == {"pending"}
            else "restore the applied files as they were; add changes as new migrations",
        )


def _pending_findings(
    ctx: typer.Context, folder: Path, states: list[migrations.MigrationState]
) -> list[Finding]:
    """The lint of the pending files, when they can be planned and read (else status shows
    them without it: `migrate --dry-run` names what is wrong)."""
    if not any(s.state == "pending" for s in states):
        return []
    try:
        return migrations.lint_pending(connect(ctx), folder, allow_out_of_order=True)
    except MigrationError:
        return []


def _lint_counts(found: list[Finding], version: int) -> dict[str, int]:
    mine = [f for f in found if f.version == version]
    if not mine:
        return {}
    return {"lintFindings": len(mine), "lintAccepted": sum(f.accepted for f in mine)}


@app.command("lint")
def lint(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    as_json: bool = JSON_OPTION,
    strict: bool = typer.Option(
        False, "--strict", help="Exit 7 when a finding is not accepted by a lint-ok comment."
    ),
) -> None:
    """Name what the pending statements would do to the live database: locks that block
    writes on existing tables, drops and renames, missing lock timeouts (and the safe way)."""

    _refuse_group_options(ctx, "lint", to_applies=True)
    found = migrations.lint_pending(connect(ctx), _directory(ctx, directory), target=_group(ctx).to)
    if as_json:
        print_json({"findings": [f.to_json() for f in found]})
    else:
        write_findings(found, sys.stdout, terminal=sys.stdout.isatty())
        note(f"lint: {findings_summary(found)}")
    open_findings = [f for f in found if not f.accepted]
    if strict and open_findings:
        raise MigrationError(
            f"lint --strict: {findings_summary(open_findings)} not accepted",
            hint="apply the fix, or accept one with '-- towerctl:lint-ok RULE reason' above it",
        )


@app.command("baseline")
def baseline(
    ctx: typer.Context,
    directory: Path | None = DIR_OPTION,
    to: int | None = typer.Option(
        None,
        "--to",
        metavar="VERSION",
        parser=VERSION,
        help="Record versions up to this one as applied.",
    ),
    lock_timeout: float | None = typer.Option(None, "--lock-timeout", help=LOCK_TIMEOUT_HELP),
) -> None:
    """Record versions <= --to as applied without running them (schema made another way)."""

    _refuse_group_options(ctx, "baseline", to_applies=True)
    target = to if to is not None else _group(ctx).to
    if target is None:
        raise BadInput("migrate baseline needs --to VERSION")
    recorded = migrations.baseline(
        connect(ctx),
        _directory(ctx, directory),
        migrations.check_version(target, "--to"),
        lock_timeout=_lock_timeout(ctx, lock_timeout),
        notify=note,
    )
    for m in recorded:
        note(f"recorded {m.filename} as applied (baseline)")
    note(f"baseline: {len(recorded)} version{'s' if len(recorded) != 1 else ''} recorded")


@app.command("new")
def new(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="What the migration does, e.g. add_session_tags."),
    directory: Path | None = DIR_OPTION,
) -> None:
    """Write the next numbered, empty migration file into --dir, TOWER_MIGRATIONS_DIR or
    ./migrations (never the installed package) and print its path."""

    _refuse_group_options(ctx, "new")
    path = migrations.new_file(_new_file_directory(ctx, directory), name)
    sys.stdout.write(f"{path}\n")


def _new_file_directory(ctx: typer.Context, path: Path | None) -> Path:
    """Where `migrate new` writes: --dir, TOWER_MIGRATIONS_DIR, or ./migrations (as dbmate
    does); never the packaged migrations, which `migrate` applies by default."""

    given = path or _group(ctx).directory
    if given is not None:
        return given
    explicit = os.environ.get("TOWER_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    local = Path("migrations")
    if not local.is_dir():
        raise BadInput(
            "migrate new needs your migrations folder: --dir PATH, TOWER_MIGRATIONS_DIR, "
            "or a ./migrations folder (there is none here)",
            hint="the packaged migrations are towerctl's own; 'towerctl context' shows them",
        )
    return local


@app.command("repair")
def repair(
    ctx: typer.Context,
    version: int = typer.Argument(
        ..., metavar="VERSION", parser=VERSION, help="The applied version whose file was edited."
    ),
    directory: Path | None = DIR_OPTION,
    force: bool = typer.Option(
        False, "--force", help="Accept the new checksum even if the statements changed."
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask to confirm --force."),
    lock_timeout: float | None = typer.Option(None, "--lock-timeout", help=LOCK_TIMEOUT_HELP),
) -> None:
    """Accept an applied file's new checksum when the change is cosmetic (or with --force)."""

    _refuse_group_options(ctx, "repair")
    migrations.check_version(version, "version")
    if force and not yes:
        if not sys.stdin.isatty():
            raise BadInput("refusing --force without --yes when not on a terminal")
        if not typer.confirm(
            f"Accept the file of version {version} as applied even if its statements changed?",
            err=True,
        ):
            raise BadInput("not confirmed; nothing repaired")
    done = migrations.repair(
        connect(ctx),
        _directory(ctx, directory),
        version,
        force=force,
        lock_timeout=_lock_timeout(ctx, lock_timeout),
        notify=note,
    )
    if done is None:
        note(f"version {version} already matches its file: nothing to repair")
    elif done.cosmetic:
        note(f"repaired {done.migration.filename}: the change is cosmetic (same statements)")
    else:
        note(f"repaired {done.migration.filename} by --force: the statements changed")
