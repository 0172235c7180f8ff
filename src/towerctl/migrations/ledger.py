"""The migration ledger's tables and the guard: the transaction-scoped advisory lock, the
in-transaction re-check of the ledger, and the lease of no-transaction files (waited for
outside any transaction)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime

import psycopg

from towerctl.errors import BadInput, DatabaseUnreachable, MigrationError
from towerctl.migrations.files import Migration
from towerctl.migrations.lint import Catalog, TableSize
from towerctl.migrations.plan import AppliedMigration
from towerctl.render import iso

LEDGER_TABLE = "tower_schema_migrations"
LEASE_TABLE = "tower_schema_migration_lease"
REPAIRS_TABLE = "tower_schema_migration_repairs"
LOCK_KEY = 0x746F776572_6D6967  # "tower" "mig"
MAX_LOCK_WAIT_SECONDS = 86_400
LEASE_GRACE_SECONDS = 5  # a lease whose holder stopped renewing it (and runs nothing) expires
LEASE_TAG = "towerctl-lease:"
POLL_FIRST, POLL_MAX = 0.02, 0.5  # seconds between looks at a lease, doubling

CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    version      bigint PRIMARY KEY,
    name         text NOT NULL,
    checksum     text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    execution_ms double precision NOT NULL DEFAULT 0,
    baseline     boolean NOT NULL DEFAULT false
)"""
# Added to ledgers made by earlier towerctl: a nullable column without default is
# a catalog-only change (its lock is brief and bounded by the lock timeout).
ADD_TREE_CHECKSUM = f"ALTER TABLE {LEDGER_TABLE} ADD COLUMN IF NOT EXISTS tree_checksum text"
CREATE_LEASE = f"""
CREATE TABLE IF NOT EXISTS {LEASE_TABLE} (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    token            text NOT NULL,
    version          bigint NOT NULL,
    file             text NOT NULL,
    owner            text NOT NULL,
    application_name text NOT NULL,
    started_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    deadline         timestamptz NOT NULL
)"""
CREATE_REPAIRS = f"""
CREATE TABLE IF NOT EXISTS {REPAIRS_TABLE} (
    version       bigint NOT NULL,
    old_checksum  text NOT NULL,
    new_checksum  text NOT NULL,
    forced        boolean NOT NULL,
    repaired_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (version, repaired_at)
)"""
LEDGER_READY = f"""
SELECT to_regclass('{LEASE_TABLE}') IS NOT NULL AND to_regclass('{REPAIRS_TABLE}') IS NOT NULL
   AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('{LEDGER_TABLE}')
               AND attname = 'tree_checksum' AND NOT attisdropped),
       pg_is_in_recovery()"""
INVALID_INDEXES = """
SELECT i.indexrelid::regclass FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace"""
READ_LEDGER = f"""
SELECT version, name, checksum, applied_at, execution_ms, baseline,
       to_jsonb(m) ->> 'tree_checksum'
FROM {LEDGER_TABLE} m ORDER BY version"""
INSERT_LEDGER = f"""
INSERT INTO {LEDGER_TABLE} (version, name, checksum, execution_ms, baseline, tree_checksum)
VALUES (%s, %s, %s, %s, %s, %s)"""
LEASE_LIVE = f"""
l.deadline > clock_timestamp() OR EXISTS (
    SELECT 1 FROM pg_stat_activity a
    WHERE a.pid <> pg_backend_pid() AND a.state <> 'idle'
      AND strpos(a.query, '{LEASE_TAG}' || l.token) > 0)"""
READ_LEASE = f"""
SELECT l.token, l.file, l.owner, l.application_name, l.started_at, ({LEASE_LIVE})
FROM {LEASE_TABLE} l"""
# Inside a file's transaction, after the lock: is the version applied (and how),
# what is the highest applied version, and does a live lease forbid running now?
RECHECK = f"""
SELECT (SELECT checksum FROM {LEDGER_TABLE} WHERE version = %s),
       (SELECT max(version) FROM {LEDGER_TABLE}),
       (SELECT file FROM {LEASE_TABLE} l WHERE {LEASE_LIVE})"""
TAKE_LEASE = f"""
INSERT INTO {LEASE_TABLE} (token, version, file, owner, application_name, deadline)
VALUES (%s, %s, %s, %s, current_setting('application_name'),
        clock_timestamp() + make_interval(secs => %s))
ON CONFLICT (singleton) DO UPDATE SET
    token = excluded.token, version = excluded.version, file = excluded.file,
    owner = excluded.owner, application_name = excluded.application_name,
    started_at = excluded.started_at, deadline = excluded.deadline"""
RENEW_LEASE = f"""
UPDATE {LEASE_TABLE} SET deadline = clock_timestamp() + make_interval(secs => %s)
WHERE token = %s"""
DROP_LEASE = f"DELETE FROM {LEASE_TABLE} WHERE token = %s"
# The live tables (and indexes, with their table) that a pending statement may lock, with
# PostgreSQL's row estimate (-1: never analyzed) and their size on disk (indexes, TOAST too).
READ_CATALOG = """
SELECT n.nspname, c.relname, c.relkind IN ('i', 'I'), t.relname, c.reltuples::float8,
       CASE WHEN c.relkind IN ('r', 'p', 'm') THEN pg_total_relation_size(c.oid) ELSE 0 END
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index x ON x.indexrelid = c.oid
LEFT JOIN pg_class t ON t.oid = x.indrelid
WHERE c.relkind IN ('r', 'p', 'm', 'i', 'I')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_(toast|temp_)'"""
LOCK_HOLDER = """
SELECT a.pid, a.application_name, coalesce(a.xact_start, a.backend_start)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid
ORDER BY a.xact_start LIMIT 1"""


Notify = Callable[[str], None]


def read_ledger(conn: psycopg.Connection) -> list[AppliedMigration]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return []
    return [AppliedMigration(*row) for row in conn.execute(READ_LEDGER).fetchall()]


def read_catalog(conn: psycopg.Connection) -> Catalog:
    """The live tables before a run, for the lint: sizes, indexes' tables, the search path."""
    row = conn.execute("SELECT current_schemas(false)").fetchone()
    search_path = tuple(row[0]) if row and row[0] else ()
    tables: dict[tuple[str, str], TableSize] = {}
    indexes: dict[tuple[str, str], tuple[str, str]] = {}
    for schema, name, is_index, table, rows, size in conn.execute(READ_CATALOG):
        if is_index:
            indexes[(schema, name)] = (schema, table)
        else:
            tables[(schema, name)] = TableSize(None if rows < 0 else round(rows), size)
    return Catalog(search_path, tables, indexes)


def check_wait(timeout_seconds: float) -> None:
    if not 0 <= timeout_seconds <= MAX_LOCK_WAIT_SECONDS:
        raise BadInput(f"--lock-timeout must be from 0 to {MAX_LOCK_WAIT_SECONDS} seconds")


def refused(timeout_seconds: float, holder: str | None) -> MigrationError:
    who = f" ({holder})" if holder else ""
    return MigrationError(
        f"another migration run{who} held the lock for more than {timeout_seconds:g}s",
        hint="wait for it to finish or raise --lock-timeout",
    )


def _lock_holder(conn: psycopg.Connection) -> str | None:
    row = conn.execute(LOCK_HOLDER, (LOCK_KEY >> 32, LOCK_KEY & 0xFFFFFFFF)).fetchone()
    if not row:
        return None
    pid, app, since = row
    return f"pid {pid}, application {app or '-'}, since {_clock(since)}"


def _clock(moment: datetime | None) -> str:
    return iso(moment) or "-"


def take_lock(conn: psycopg.Connection, timeout_seconds: float, notify: Notify | None) -> None:
    """Take the transaction-scoped migration lock in the current transaction, waiting at most
    `timeout_seconds` (naming the holder once)."""
    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,)).fetchone()
    if row and row[0]:
        return
    holder = _lock_holder(conn)
    if timeout_seconds == 0:
        raise refused(timeout_seconds, holder)
    if notify:
        notify(f"waiting for another migration runner's lock ({holder or 'holder unknown'})")
    conn.execute(f"SET LOCAL lock_timeout = '{max(int(timeout_seconds * 1000), 1)}ms'")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        raise refused(timeout_seconds, holder) from None


def ensure_ledger(
    conn: psycopg.Connection, timeout_seconds: float = 60.0, notify: Notify | None = None
) -> None:
    """Create the ledger tables, or bring an older ledger up to date, under the lock."""
    check_wait(timeout_seconds)
    ready = conn.execute(LEDGER_READY).fetchone()
    if ready and ready[1]:
        # A hot standby takes no migration: one line (exit 8) before anything is announced.
        raise DatabaseUnreachable(
            "the database is read-only (a standby?): migrations go to the primary",
            hint="point --database-url / TOWER_DATABASE_URL at the primary",
        )
    if ready and ready[0]:
        return
    with conn.transaction():
        take_lock(conn, timeout_seconds, notify)
        conn.execute("SET LOCAL lock_timeout = '10s'")
        for ddl in (CREATE_LEDGER, ADD_TREE_CHECKSUM, CREATE_LEASE, CREATE_REPAIRS):
            conn.execute(ddl)


def statement_lock_timeout() -> float:
    """How long a migration statement may wait for a table lock before the file fails
    (`TOWER_MIGRATION_LOCK_TIMEOUT`, seconds, default 10; 0 waits forever), so DDL never
    queues behind a long transaction while blocking the traffic behind it."""
    raw = os.environ.get("TOWER_MIGRATION_LOCK_TIMEOUT", "10")
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_LOCK_WAIT_SECONDS:
        raise BadInput(
            f"TOWER_MIGRATION_LOCK_TIMEOUT must be seconds from 0 to {MAX_LOCK_WAIT_SECONDS}"
        )
    return value


class LeaseBusy(Exception):
    """A live lease forbids running now: leave the transaction and wait outside it."""


class Skipped(Exception):
    """Another runner applied this version meanwhile."""


def recheck(conn: psycopg.Connection, migration: Migration, allow_out_of_order: bool) -> None:
    row = conn.execute(RECHECK, (migration.version,)).fetchone()
    applied, highest, lease_file = row if row else (None, None, None)
    if applied is not None:
        if applied != migration.checksum:
            raise MigrationError(
                f"{migration.filename} was applied meanwhile by another runner with a "
                "different checksum (drift)"
            )
        raise Skipped
    if lease_file is not None:
        raise LeaseBusy
    if highest is not None and highest > migration.version and not allow_out_of_order:
        raise MigrationError(
            f"{migration.filename} is pending but version {highest} was applied meanwhile "
            "(out of order; use --allow-out-of-order to apply it anyway)"
        )


def wait_for_lease(conn: psycopg.Connection, timeout_seconds: float, notify: Notify | None) -> None:
    """Wait, outside any transaction, until no live lease exists (at most `timeout_seconds`)."""
    deadline = time.monotonic() + timeout_seconds
    pause = POLL_FIRST
    announced = False
    while True:
        row = conn.execute(READ_LEASE).fetchone()
        if row is None or not row[5]:
            return
        _token, file, owner, app, since, _live = row
        holder = f"{file} by {owner}, application {app or '-'}, since {_clock(since)}"
        if time.monotonic() >= deadline:
            raise refused(timeout_seconds, holder)
        if notify and not announced:
            notify(f"waiting for another migration runner ({holder})")
            announced = True
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.001)))
        pause = min(pause * 2, POLL_MAX)
