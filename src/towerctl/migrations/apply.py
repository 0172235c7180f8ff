"""Running planned steps: a transactional file in one transaction, a no-transaction file
statement by statement under its lease."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence

import psycopg

from towerctl import distribute
from towerctl.db import first_line
from towerctl.errors import MigrationError
from towerctl.migrations.files import Migration
from towerctl.migrations.ledger import (
    DROP_LEASE,
    INSERT_LEDGER,
    INVALID_INDEXES,
    LEASE_GRACE_SECONDS,
    LEASE_TAG,
    RENEW_LEASE,
    TAKE_LEASE,
    LeaseBusy,
    Notify,
    Skipped,
    check_wait,
    recheck,
    statement_lock_timeout,
    take_lock,
    wait_for_lease,
)
from towerctl.migrations.plan import Step

LOCK_NOT_AVAILABLE = "55P03"
# Who holds locks on this database's tables: the sessions a statement could wait for.
TABLE_LOCK_HOLDERS = """
SELECT a.pid, coalesce(nullif(a.application_name, ''), '-'), coalesce(a.state, '-'),
       coalesce(to_char(a.xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '-')
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.pid IN (
    SELECT l.pid FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE l.granted AND l.locktype = 'relation'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace))
ORDER BY a.xact_start NULLS LAST
LIMIT 3"""


def _holders(conn: psycopg.Connection) -> str:
    """`, held by pid 123 (psql, idle in transaction since ...)`, or nothing when unknown."""
    try:
        rows = conn.execute(TABLE_LOCK_HOLDERS).fetchall()
    except Exception:
        return ""
    shown = [f"pid {pid} ({app}, {state} since {since})" for pid, app, state, since in rows]
    return f", held by {'; '.join(shown)}" if shown else ""


def _failure(conn: psycopg.Connection, step: Step, current: int, error: Exception) -> Exception:
    """The error to raise for a failed statement: the connection's own loss passes through
    (exit 8); anything else names the file and the line (exit 7)."""

    if conn.broken or conn.closed:
        return error
    if current >= len(step.statements):  # a transactional file's ledger row or COMMIT
        what = "COMMIT" if current > len(step.statements) else "recording it in the ledger"
        return MigrationError(
            f"{step.migration.filename}: {what} failed: {first_line(error)}",
            hint="nothing of this file was applied",
        )
    statement = step.statements[current]
    if getattr(error, "sqlstate", None) == LOCK_NOT_AVAILABLE:
        return MigrationError(
            f"{step.migration.filename}, line {statement.line}: waited "
            f"{statement_lock_timeout():g}s for a table lock{_holders(conn)}",
            hint="nothing of this file was applied; end that session or raise "
            "TOWER_MIGRATION_LOCK_TIMEOUT (the wait for table locks; --lock-timeout is the "
            "wait for another runner)",
        )
    diag = getattr(error, "diag", None)
    position = getattr(diag, "statement_position", None)
    line = statement.line_of(int(position)) if position else statement.line
    if step.migration.transactional:
        hint = "nothing of this file was applied"
    else:
        ran = [str(s.line) for s in step.statements[:current]]
        hint = (
            f"no-transaction file: statements at line{'s' if len(ran) != 1 else ''} "
            f"{', '.join(ran)} ran and stay applied; each is safe to run again"
            if ran
            else "no-transaction file: no statement of it ran"
        )
    return MigrationError(f"{step.migration.filename}, line {line}: {first_line(error)}", hint=hint)


def _apply_in_transaction(
    conn: psycopg.Connection, step: Step, wait: float, allow_out_of_order: bool,
    notify: Notify | None, cluster: bool = False,
) -> float:  # fmt: skip
    """A transactional file in one transaction: the lock (waited for, naming the holder),
    the ledger re-checked, the statements, the ledger row; a live lease of a no-transaction
    file is waited for outside the transaction. On a Citus cluster the file's statements
    reach the shards one connection per node (Citus refuses DDL on a table after a
    parallel statement in the same transaction)."""
    migration = step.migration
    statement_ms = int(statement_lock_timeout() * 1000)
    tree = step.tree_checksum
    while True:
        current = -1
        try:
            with conn.transaction():
                take_lock(conn, wait, notify)
                recheck(conn, migration, allow_out_of_order)
                conn.execute(f"SET LOCAL lock_timeout = '{statement_ms}ms'")
                if cluster:
                    conn.execute("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")
                started = time.perf_counter()
                for index, statement in enumerate(step.statements):
                    current = index
                    conn.execute(statement.text)
                current = len(step.statements)  # the ledger row, then COMMIT
                elapsed = (time.perf_counter() - started) * 1000
                conn.execute(
                    INSERT_LEDGER,
                    (migration.version, migration.name, migration.checksum, elapsed, False, tree),
                )
                current += 1
            return elapsed
        except LeaseBusy:
            wait_for_lease(conn, wait, notify)
        except psycopg.Error as error:
            if current < 0:
                raise
            raise _failure(conn, step, current, error) from None


def _apply_without_transaction(
    conn: psycopg.Connection, step: Step, wait: float, allow_out_of_order: bool,
    notify: Notify | None,
) -> float:  # fmt: skip
    migration = step.migration
    token = os.urandom(12).hex()  # os.urandom is what secrets uses
    owner = f"pid {os.getpid()} on {socket.gethostname()}"
    while True:
        wait_for_lease(conn, wait, notify)
        try:
            with conn.transaction():
                take_lock(conn, wait, notify)
                recheck(conn, migration, allow_out_of_order)
                conn.execute(
                    TAKE_LEASE,
                    (token, migration.version, migration.filename, owner, LEASE_GRACE_SECONDS),
                )
            break
        except LeaseBusy:
            continue
    statement_ms = int(statement_lock_timeout() * 1000)
    started = time.perf_counter()
    current = 0
    try:
        conn.execute(f"SET lock_timeout = '{statement_ms}ms'")
        for index, statement in enumerate(step.statements):
            current = index
            renewed = conn.execute(RENEW_LEASE, (LEASE_GRACE_SECONDS, token)).rowcount
            if not renewed:
                raise MigrationError(
                    f"{migration.filename}: another runner took over this file's lease",
                    hint="run towerctl migrate again",
                )
            # The tag lets waiters see that this statement still runs (even after a kill).
            conn.execute(f"{statement.text}\n/* {LEASE_TAG}{token} */")
        conn.execute("RESET lock_timeout")
        invalid = conn.execute(INVALID_INDEXES).fetchall()
        if invalid:
            names = ", ".join(str(row[0]) for row in invalid)
            raise MigrationError(
                f"{migration.filename}: invalid index {names} (left by an interrupted "
                "CREATE INDEX CONCURRENTLY); not recorded",
                hint=f"DROP INDEX CONCURRENTLY {invalid[0][0]}; then run towerctl migrate again",
            )
        elapsed = (time.perf_counter() - started) * 1000
        with conn.transaction():
            take_lock(conn, wait, notify)
            conn.execute(
                INSERT_LEDGER,
                (
                    migration.version, migration.name, migration.checksum, elapsed, False,
                    step.tree_checksum,
                ),
            )  # fmt: skip
            conn.execute(DROP_LEASE, (token,))
        return elapsed
    except psycopg.Error as error:
        _release(conn, token)
        raise _failure(conn, step, current, error) from None
    except MigrationError:
        _release(conn, token)
        raise


def _release(conn: psycopg.Connection, token: str) -> None:
    if conn.broken or conn.closed:
        return
    try:
        conn.execute("RESET lock_timeout")
        conn.execute(DROP_LEASE, (token,))
    except psycopg.Error:
        pass  # the lease expires by itself


def apply(
    conn: psycopg.Connection,
    steps: Sequence[Step],
    *,
    lock_timeout: float = 60.0,
    allow_out_of_order: bool = False,
    on_applied: Callable[[Migration, float], None] | None = None,
    notify: Notify | None = None,
) -> list[Migration]:
    """Apply every step in order, stopping at the first failure; a step another runner
    applied meanwhile is skipped. Statements wait at most `statement_lock_timeout()` for a
    table lock; the guard waits at most `lock_timeout`."""
    check_wait(lock_timeout)
    done: list[Migration] = []
    # A store laid out over Citus (`db distribute`): a table or function a file adds is
    # placed by the same plan right after the file, before the next one runs.
    cluster = bool(steps) and distribute.distributed(conn, distribute.ANCHOR)
    for step in steps:
        name = step.migration.filename
        if notify:
            notify(f"applying {name} …")
        try:
            if step.migration.transactional:
                elapsed = _apply_in_transaction(
                    conn, step, lock_timeout, allow_out_of_order, notify, cluster
                )
            else:
                elapsed = _apply_without_transaction(
                    conn, step, lock_timeout, allow_out_of_order, notify
                )
        except Skipped:
            if notify:
                notify(f"{name} was applied by another runner meanwhile")
            continue
        done.append(step.migration)
        if on_applied:
            on_applied(step.migration, elapsed)
        if cluster:
            for placed in distribute.apply(conn, distribute.plan(conn)):
                if notify:
                    notify(f"{placed.action} {placed.target}: {placed.detail}")
    return done
