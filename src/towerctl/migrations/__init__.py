"""Numbered SQL migrations: discover files, plan against the ledger, apply.

`plan_migrations(files, ledger)` is a pure function: it returns the steps to run
or raises `MigrationError` naming every problem. `prepare(plan)` parses every
step with PostgreSQL's grammar and refuses what the run would refuse, before
anything is applied. `apply` runs the steps.

The guard needs no session state, so it holds through a transaction-pooling
PgBouncer and frees itself when a runner dies:

- a transactional file runs in one transaction that first takes
  `pg_advisory_xact_lock(LOCK_KEY)` (waiting at most the lock timeout), then
  re-reads the ledger for its version, runs the file, and inserts its ledger row
  (every commit waits for the disk);
- a no-transaction file first takes a *lease*: a row in `LEASE_TABLE` written by a
  short transaction under the same lock. Other runners wait for it outside any
  transaction (polling with backoff), so they never hold a snapshot that the
  file's `CREATE INDEX CONCURRENTLY` waits for. The lease is live while its
  deadline (renewed before each statement) has not passed or while one of its
  statements, tagged with the lease's token, still runs on the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from towerctl.errors import BadInput, MigrationError
from towerctl.migrations.apply import apply
from towerctl.migrations.files import (
    BOM,
    FILE_NAME,
    MAX_VERSION,
    MIGRATION_NAME,
    NO_TRANSACTION_MARK,
    Migration,
    check_statements,
    check_version,
    checksum,
    default_dir,
    discover,
    new_file,
    read_migration,
    tree_checksum,
    tree_or_none,
)
from towerctl.migrations.ledger import (
    INSERT_LEDGER,
    INVALID_INDEXES,
    LEASE_TABLE,
    LEDGER_TABLE,
    LOCK_KEY,
    MAX_LOCK_WAIT_SECONDS,
    REPAIRS_TABLE,
    Notify,
    check_wait,
    ensure_ledger,
    read_catalog,
    read_ledger,
    statement_lock_timeout,
    take_lock,
    wait_for_lease,
)
from towerctl.migrations.lint import RULES, Catalog, Finding, describe_size
from towerctl.migrations.lint import lint as lint_facts
from towerctl.migrations.plan import (
    AppliedMigration,
    MigrationState,
    Plan,
    Step,
    describe_plan,
    find_problems,
    plan_migrations,
    prepare,
    refuse,
    status,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "BOM", "FILE_NAME", "INVALID_INDEXES", "LEASE_TABLE", "LEDGER_TABLE", "LOCK_KEY",
    "MAX_LOCK_WAIT_SECONDS", "MAX_VERSION", "MIGRATION_NAME", "NO_TRANSACTION_MARK",
    "REPAIRS_TABLE", "RULES", "AppliedMigration", "Catalog", "Finding", "Migration",
    "MigrationState", "Plan", "Repair", "Step", "apply", "baseline", "check_statements",
    "check_version", "checksum", "default_dir", "describe_plan", "describe_size", "discover",
    "dry_run", "ensure_ledger", "lint_pending", "lint_steps", "migrate", "new_file",
    "plan_migrations", "prepare", "read_catalog", "read_ledger", "read_migration", "repair",
    "statement_lock_timeout", "status", "tree_checksum", "wait_for_lease",
]  # fmt: skip


def migrate(
    conn: psycopg.Connection,
    directory: Path,
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
    lock_timeout: float = 60.0,
    on_applied: Callable[[Migration, float], None] | None = None,
    notify: Notify | None = None,
) -> list[Migration]:
    """Check, plan and apply: the whole of `towerctl migrate`."""
    check_wait(lock_timeout)
    files = discover(directory)
    plan = plan_migrations(
        files, read_ledger(conn), target=target, allow_out_of_order=allow_out_of_order
    )
    if not plan.steps:
        return []
    steps = prepare(plan)
    ensure_ledger(conn, lock_timeout, notify)  # refuses a hot standby first (exit 8)
    return apply(
        conn,
        steps,
        lock_timeout=lock_timeout,
        allow_out_of_order=allow_out_of_order,
        on_applied=on_applied,
        notify=notify,
    )


def dry_run(
    conn: psycopg.Connection,
    directory: Path,
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
) -> list[Step]:
    """Every check `migrate` makes before it applies anything; changes nothing."""
    files = discover(directory)
    plan = plan_migrations(
        files, read_ledger(conn), target=target, allow_out_of_order=allow_out_of_order
    )
    return prepare(plan)


def lint_steps(conn: psycopg.Connection, steps: Sequence[Step]) -> list[Finding]:
    """The lint's findings for checked steps, against the live catalog (SPEC 12)."""
    return lint_facts(
        ((step.migration, step.facts) for step in steps),
        read_catalog(conn),
        runner_sets_lock_timeout=statement_lock_timeout() > 0,
    )


def lint_pending(
    conn: psycopg.Connection,
    directory: Path,
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
) -> list[Finding]:
    """`migrate lint`: the checks of a dry run, then the findings of the pending statements."""
    steps = dry_run(conn, directory, target=target, allow_out_of_order=allow_out_of_order)
    return lint_steps(conn, steps)


def baseline(
    conn: psycopg.Connection,
    directory: Path,
    target: int,
    *,
    lock_timeout: float = 60.0,
    notify: Notify | None = None,
) -> list[Migration]:
    """Record every file up to `target` as applied without running it."""
    check_wait(lock_timeout)
    check_version(target, "--to")
    files = discover(directory)
    if target not in {m.version for m in files}:
        raise BadInput(f"--to {target}: no migration has that version")
    ensure_ledger(conn, lock_timeout, notify)
    wait_for_lease(conn, lock_timeout, notify)
    with conn.transaction():
        take_lock(conn, lock_timeout, notify)
        ledger = read_ledger(conn)
        problems = find_problems(files, ledger)
        if problems:
            raise refuse(problems)
        applied = {row.version for row in ledger}
        chosen = [m for m in files if m.version <= target and m.version not in applied]
        for m in chosen:
            conn.execute(INSERT_LEDGER, (m.version, m.name, m.checksum, 0.0, True, tree_or_none(m)))
        return chosen


@dataclass(frozen=True)
class Repair:
    migration: Migration
    old_checksum: str
    cosmetic: bool
    forced: bool


def repair(
    conn: psycopg.Connection,
    directory: Path,
    version: int,
    *,
    force: bool = False,
    lock_timeout: float = 60.0,
    notify: Notify | None = None,
) -> Repair | None:
    """Accept an applied file's new checksum when PostgreSQL's parser reads the same statements
    from it as from the file that was applied (or with `force`); record the repair.
    Returns None when the file already matches its ledger row."""
    from towerctl.migrations.grammar import SQLSyntaxError  # pglast: only when a file is parsed

    check_wait(lock_timeout)
    check_version(version, "version")
    files = [m for m in discover(directory) if m.version == version]
    if not files:
        raise MigrationError(f"no migration file has version {version}")
    if len(files) > 1:
        names = " and ".join(m.filename for m in files)
        raise MigrationError(f"duplicate version {version}: {names} (renumber one of them)")
    migration = files[0]
    try:
        new_tree = tree_checksum(migration.sql)
    except SQLSyntaxError as error:
        if not force:
            raise MigrationError(f"{migration.filename}: {error}") from None
        new_tree = None
    ensure_ledger(conn, lock_timeout, notify)
    wait_for_lease(conn, lock_timeout, notify)
    with conn.transaction():
        take_lock(conn, lock_timeout, notify)
        row = conn.execute(
            f"SELECT checksum, tree_checksum FROM {LEDGER_TABLE} WHERE version = %s", (version,)
        ).fetchone()
        if row is None:
            raise MigrationError(f"version {version} is not applied: nothing to repair")
        old_checksum, old_tree = row
        if old_checksum == migration.checksum:
            return None
        cosmetic = old_tree is not None and new_tree == old_tree
        if not cosmetic and not force:
            why = (
                "the ledger has no parse tree for it (applied by an older towerctl)"
                if old_tree is None
                else "PostgreSQL reads different statements from it"
            )
            raise MigrationError(
                f"{migration.filename} changed and the change is not cosmetic: {why}",
                hint="write a new migration for the change, or use --force if you are sure",
            )
        conn.execute(
            f"UPDATE {LEDGER_TABLE} SET checksum = %s, name = %s, tree_checksum = %s "
            "WHERE version = %s",
            (migration.checksum, migration.name, new_tree, version),
        )
        conn.execute(
            f"INSERT INTO {REPAIRS_TABLE} (version, old_checksum, new_checksum, forced) "
            "VALUES (%s, %s, %s, %s)",
            (version, old_checksum, migration.checksum, not cosmetic),
        )
    return Repair(migration, old_checksum, cosmetic, not cosmetic)
