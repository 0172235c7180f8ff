"""Numbered SQL migrations: discover files, plan against the ledger, apply.

`plan_migrations(files, ledger)` is a pure function: it returns the steps to run
or raises `MigrationError` naming every problem. `prepare(plan)` parses every
step with PostgreSQL's grammar and refuses what the run would refuse, before
anything is applied. `apply` runs the steps.

The guard needs no session state, so it holds through a transaction-pooling
PgBouncer and frees itself when a runner dies:

- a transactional file runs in one transaction that first takes
  `pg_advisory_xact_lock(LOCK_KEY)` (waiting at most the lock timeout), then
  re-reads the ledger for its version, runs the file, and inserts its ledger row;
- a no-transaction file first takes a *lease*: a row in `LEASE_TABLE` written by a
  short transaction under the same lock. Other runners wait for it outside any
  transaction (polling with backoff), so they never hold a snapshot that the
  file's `CREATE INDEX CONCURRENTLY` waits for. The lease is live while its
  deadline (renewed before each statement) has not passed or while one of its
  statements, tagged with the lease's token, still runs on the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from towerctl import sqlsplit
from towerctl.errors import BadInput, MigrationError
from towerctl.sqlsplit import Statement

if TYPE_CHECKING:
    import psycopg

FILE_NAME = re.compile(r"^([0-9]+)_([A-Za-z0-9][A-Za-z0-9_.\-]*)\.sql$", re.ASCII | re.IGNORECASE)
MIGRATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", re.ASCII)
MAX_VERSION = 2**63 - 1  # PostgreSQL's bigint
NO_TRANSACTION_MARK = "-- towerctl:no-transaction"
BOM = "\ufeff"
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
               AND attname = 'tree_checksum' AND NOT attisdropped)"""
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
LOCK_HOLDER = """
SELECT a.pid, a.application_name, coalesce(a.xact_start, a.backend_start)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid
ORDER BY a.xact_start LIMIT 1"""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    path: Path
    checksum: str
    sql: str = field(repr=False)
    transactional: bool = True

    @property
    def filename(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class AppliedMigration:
    """One row of the ledger."""

    version: int
    name: str
    checksum: str
    applied_at: datetime | None
    execution_ms: float
    baseline: bool = False
    tree_checksum: str | None = None


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    state: str  # applied | pending | changed | missing | duplicate
    checksum: str  # the ledger's when applied, else the file's
    applied_at: datetime | None
    execution_ms: float | None
    baseline: bool = False
    file_checksum: str | None = None
    filename: str | None = None


@dataclass(frozen=True)
class Plan:
    steps: tuple[Migration, ...]
    target: int | None
    allow_out_of_order: bool = False


@dataclass(frozen=True)
class Step:
    """A planned file with its statements, checked and ready to run."""

    migration: Migration
    statements: tuple[Statement, ...]


Notify = Callable[[str], None]


def checksum(data: bytes) -> str:
    """SHA-256 of a file with CRLF normalised to LF."""
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def tree_checksum(sql: str) -> str:
    """SHA-256 of the file's parse tree without locations: unchanged by cosmetic edits."""
    tree = sqlsplit.parse_tree(sql.removeprefix(BOM))
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def default_dir() -> Path:
    """The migrations shipped in the package (or the repository's `sql/` when run from source)."""
    explicit = os.environ.get("TOWER_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    packaged = Path(__file__).parent / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def check_version(value: int, what: str) -> int:
    """A version as given on the command line: within bigint, else exit 2."""
    if not 0 <= value <= MAX_VERSION:
        raise BadInput(f"{what} {value}: versions are whole numbers from 0 to {MAX_VERSION}")
    return value


def read_migration(path: Path, version: int, name: str) -> Migration:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MigrationError(f"cannot read {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").removeprefix(BOM)
    except UnicodeDecodeError:
        raise MigrationError(f"{path.name} is not UTF-8 text") from None
    if "\x00" in text:
        raise MigrationError(f"{path.name} contains a NUL byte")
    first_line = text.split("\n", 1)[0].strip()
    return Migration(
        version=version,
        name=name,
        path=path,
        checksum=checksum(data),
        sql=text,
        transactional=first_line != NO_TRANSACTION_MARK,
    )


def discover(directory: Path) -> list[Migration]:
    """Every `NNNN_name.sql` (any letter case of `.sql`) in `directory`, by version then name."""
    if directory.exists() and not directory.is_dir():
        raise MigrationError(f"{directory} is not a folder of migrations")
    if not directory.is_dir():
        raise BadInput(
            f"migrations folder not found: {directory}",
            hint="check --dir or TOWER_MIGRATIONS_DIR",
        )
    found: list[Migration] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise MigrationError(f"cannot list {directory}: {error.strerror}") from None
    for path in entries:
        if not path.name.lower().endswith(".sql"):
            continue
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(
                f"{path.name} is not named like NNNN_name.sql (ASCII digits, then a name)",
                hint="rename it or move it out of the migrations folder",
            )
        version = int(match.group(1))
        if version > MAX_VERSION:
            raise MigrationError(
                f"{path.name}: version {match.group(1)} is beyond PostgreSQL's bigint",
                hint="renumber the file",
            )
        if not path.is_file():
            raise MigrationError(f"{path.name} is not a regular file")
        found.append(read_migration(path, version, match.group(2)))
    found.sort(key=lambda m: (m.version, m.filename))
    return found


def _problems(files: Sequence[Migration], ledger: Sequence[AppliedMigration]) -> list[str]:
    problems: list[str] = []
    by_version: dict[int, list[Migration]] = {}
    for migration in files:
        by_version.setdefault(migration.version, []).append(migration)
    for _version, group in sorted(by_version.items()):
        if len(group) > 1:
            names = " and ".join(m.filename for m in group)
            problems.append(f"duplicate version {group[0].version}: {names} (renumber one of them)")
    for row in ledger:
        same = by_version.get(row.version, [])
        if not same:
            problems.append(f"applied migration {row.version}_{row.name} has no file (missing)")
        elif len(same) == 1 and same[0].checksum != row.checksum:
            problems.append(
                f"{same[0].filename} changed after it was applied (checksum drift); "
                "write a new migration instead of editing an applied one, or "
                f"'towerctl migrate repair {row.version}' if the change is cosmetic"
            )
    return problems


def _refuse(problems: list[str]) -> MigrationError:
    return MigrationError(
        problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
    )


def plan_migrations(
    files: Sequence[Migration],
    ledger: Sequence[AppliedMigration],
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
) -> Plan:
    """The files to apply, in order; raises `MigrationError` when the state is unsafe
    and `BadInput` when `target` names no version."""
    if target is not None:
        check_version(target, "--to")
        if target not in {m.version for m in files} | {row.version for row in ledger}:
            raise BadInput(f"--to {target}: no migration has that version")
    problems = _problems(files, ledger)
    applied = {row.version for row in ledger}
    pending = [m for m in files if m.version not in applied]
    highest = max(applied, default=None)
    if highest is not None and not allow_out_of_order:
        for m in pending:
            if m.version < highest:
                problems.append(
                    f"{m.filename} is pending but version {highest} is already applied "
                    "(out of order; use --allow-out-of-order to apply it anyway)"
                )
    if problems:
        raise _refuse(problems)
    steps = tuple(m for m in pending if target is None or m.version <= target)
    return Plan(steps=steps, target=target, allow_out_of_order=allow_out_of_order)


def check_statements(migration: Migration) -> tuple[Statement, ...]:
    """The file's statements as PostgreSQL's grammar reads them, or `MigrationError` naming the
    file and line of anything the run would refuse: a syntax error, transaction control, a COPY
    that needs the client's data stream, a statement that cannot run in (or, in a no-transaction
    file, cannot safely re-run outside) a transaction."""
    name = migration.filename
    try:
        statements = sqlsplit.parse_script(migration.sql)
    except sqlsplit.SQLSyntaxError as error:
        # psql-style COPY data after `COPY … FROM STDIN;` is what the grammar tripped on.
        try:
            before = sqlsplit.parse_script(migration.sql[: error.index])
        except sqlsplit.SQLSyntaxError:
            before = []
        if not (before and sqlsplit.copy_with_client(before[-1])):
            raise MigrationError(f"{name}, line {error.line}: {error}") from None
        statements = before
    for s in statements:
        if sqlsplit.is_transaction_control(s):
            verb = s.text.split(None, 1)[0].upper() if s.text else "?"
            raise MigrationError(
                f"{name}, line {s.line}: transaction control ({verb}) is not allowed; "
                "towerctl runs each file in one transaction",
                hint=f"remove it, or make the first line '{NO_TRANSACTION_MARK}'",
            )
        copy = sqlsplit.copy_with_client(s)
        if copy:
            raise MigrationError(
                f"{name}, line {s.line}: COPY … {copy} cannot run from a migration file",
                hint="load the data with INSERT, or COPY from a server-side file",
            )
        if migration.transactional and sqlsplit.needs_no_transaction(s):
            raise MigrationError(
                f"{name}, line {s.line}: {_first_words(s)} cannot run inside a transaction",
                hint=f"put it in its own file whose first line is '{NO_TRANSACTION_MARK}'",
            )
        if not migration.transactional and not sqlsplit.rerunnable(s):
            raise MigrationError(
                f"{name}, line {s.line}: {_first_words(s)} is not allowed in a no-transaction "
                "file, which may only hold statements safe to run again after a failure "
                "(CREATE INDEX CONCURRENTLY IF NOT EXISTS, DROP INDEX CONCURRENTLY IF EXISTS, "
                "REINDEX CONCURRENTLY, VACUUM, ANALYZE, ALTER TYPE … ADD VALUE IF NOT EXISTS, "
                "SELECT)",
                hint="move it to a transactional file",
            )
    return tuple(statements)


def _first_words(statement: Statement) -> str:
    return " ".join(statement.text.split()[:4]).upper()


def prepare(plan: Plan) -> list[Step]:
    """Every step checked with PostgreSQL's grammar before anything runs (all problems named)."""
    steps: list[Step] = []
    problems: list[str] = []
    for migration in plan.steps:
        try:
            steps.append(Step(migration, check_statements(migration)))
        except MigrationError as error:
            problems.append(str(error))
    if problems:
        raise _refuse(problems)
    return steps


def status(files: Sequence[Migration], ledger: Sequence[AppliedMigration]) -> list[MigrationState]:
    """Every version known to the files or the ledger, with its state."""
    rows = {row.version: row for row in ledger}
    counts: dict[int, int] = {}
    for m in files:
        counts[m.version] = counts.get(m.version, 0) + 1
    states: list[MigrationState] = []
    for m in files:
        row = rows.get(m.version)
        if counts[m.version] > 1:
            states.append(
                MigrationState(
                    m.version,
                    m.name,
                    "duplicate",
                    row.checksum if row else m.checksum,
                    row.applied_at if row else None,
                    row.execution_ms if row else None,
                    bool(row and row.baseline),
                    m.checksum,
                    m.filename,
                )
            )
        elif row is None:
            states.append(
                MigrationState(
                    m.version,
                    m.name,
                    "pending",
                    m.checksum,
                    None,
                    None,
                    False,
                    m.checksum,
                    m.filename,
                )
            )
        else:
            state = "applied" if row.checksum == m.checksum else "changed"
            states.append(
                MigrationState(
                    m.version,
                    m.name,
                    state,
                    row.checksum,
                    row.applied_at,
                    row.execution_ms,
                    row.baseline,
                    m.checksum,
                    m.filename,
                )
            )
    file_versions = set(counts)
    for row in ledger:
        if row.version not in file_versions:
            states.append(
                MigrationState(
                    row.version,
                    row.name,
                    "missing",
                    row.checksum,
                    row.applied_at,
                    row.execution_ms,
                    row.baseline,
                )
            )
    states.sort(key=lambda s: (s.version, s.filename or ""))
    return states


# --- the database side -------------------------------------------------------


def read_ledger(conn: psycopg.Connection) -> list[AppliedMigration]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return []
    return [AppliedMigration(*row) for row in conn.execute(READ_LEDGER).fetchall()]


def _check_wait(timeout_seconds: float) -> None:
    if not 0 <= timeout_seconds <= MAX_LOCK_WAIT_SECONDS:
        raise BadInput(f"--lock-timeout must be from 0 to {MAX_LOCK_WAIT_SECONDS} seconds")


def _refused(timeout_seconds: float, holder: str | None) -> MigrationError:
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
    from towerctl.render import iso

    return iso(moment) or "-"


def _take_lock(conn: psycopg.Connection, timeout_seconds: float, notify: Notify | None) -> None:
    """Take the transaction-scoped migration lock in the current transaction, waiting at most
    `timeout_seconds` (naming the holder once)."""
    import psycopg

    row = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_KEY,)).fetchone()
    if row and row[0]:
        return
    holder = _lock_holder(conn)
    if timeout_seconds == 0:
        raise _refused(timeout_seconds, holder)
    if notify:
        notify(f"waiting for another migration runner's lock ({holder or 'holder unknown'})")
    conn.execute(f"SET LOCAL lock_timeout = '{max(int(timeout_seconds * 1000), 1)}ms'")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
    except psycopg.errors.LockNotAvailable:
        raise _refused(timeout_seconds, holder) from None


def ensure_ledger(
    conn: psycopg.Connection, timeout_seconds: float = 60.0, notify: Notify | None = None
) -> None:
    """Create the ledger tables, or bring an older ledger up to date, under the lock."""
    _check_wait(timeout_seconds)
    ready = conn.execute(LEDGER_READY).fetchone()
    if ready and ready[0]:
        return
    with conn.transaction():
        _take_lock(conn, timeout_seconds, notify)
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


class _LeaseBusy(Exception):
    """A live lease forbids running now: leave the transaction and wait outside it."""


class _Skipped(Exception):
    """Another runner applied this version meanwhile."""


def _recheck(conn: psycopg.Connection, migration: Migration, allow_out_of_order: bool) -> None:
    row = conn.execute(RECHECK, (migration.version,)).fetchone()
    applied, highest, lease_file = row if row else (None, None, None)
    if applied is not None:
        if applied != migration.checksum:
            raise MigrationError(
                f"{migration.filename} was applied meanwhile by another runner with a "
                "different checksum (drift)"
            )
        raise _Skipped
    if lease_file is not None:
        raise _LeaseBusy
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
            raise _refused(timeout_seconds, holder)
        if notify and not announced:
            notify(f"waiting for another migration runner ({holder})")
            announced = True
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.001)))
        pause = min(pause * 2, POLL_MAX)


def _failure(conn: psycopg.Connection, step: Step, current: int, error: Exception) -> Exception:
    """The error to raise for a failed statement: the connection's own loss passes through
    (exit 8); anything else names the file and the line (exit 7)."""
    from towerctl.db import first_line

    if conn.broken or conn.closed:
        return error
    statement = step.statements[current]
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


def _apply_transactional(
    conn: psycopg.Connection, step: Step, wait: float, allow_out_of_order: bool,
    notify: Notify | None,
) -> float:  # fmt: skip
    import psycopg

    migration = step.migration
    statement_ms = int(statement_lock_timeout() * 1000)
    tree = tree_checksum(migration.sql)
    while True:
        current = -1
        try:
            with conn.transaction():
                _take_lock(conn, wait, notify)
                _recheck(conn, migration, allow_out_of_order)
                conn.execute(f"SET LOCAL lock_timeout = '{statement_ms}ms'")
                started = time.perf_counter()
                for index, statement in enumerate(step.statements):
                    current = index
                    conn.execute(statement.text)
                current = -1
                elapsed = (time.perf_counter() - started) * 1000
                conn.execute(
                    INSERT_LEDGER,
                    (migration.version, migration.name, migration.checksum, elapsed, False, tree),
                )
            return elapsed
        except _LeaseBusy:
            wait_for_lease(conn, wait, notify)
        except psycopg.Error as error:
            if current < 0:
                raise
            raise _failure(conn, step, current, error) from None


def _apply_without_transaction(
    conn: psycopg.Connection, step: Step, wait: float, allow_out_of_order: bool,
    notify: Notify | None,
) -> float:  # fmt: skip
    import psycopg

    migration = step.migration
    token = secrets.token_hex(12)
    owner = f"pid {os.getpid()} on {socket.gethostname()}"
    while True:
        wait_for_lease(conn, wait, notify)
        try:
            with conn.transaction():
                _take_lock(conn, wait, notify)
                _recheck(conn, migration, allow_out_of_order)
                conn.execute(
                    TAKE_LEASE,
                    (token, migration.version, migration.filename, owner, LEASE_GRACE_SECONDS),
                )
            break
        except _LeaseBusy:
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
            _take_lock(conn, wait, notify)
            conn.execute(
                INSERT_LEDGER,
                (
                    migration.version, migration.name, migration.checksum, elapsed, False,
                    tree_checksum(migration.sql),
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
    import psycopg

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
    _check_wait(lock_timeout)
    done: list[Migration] = []
    for step in steps:
        if notify:
            notify(f"applying {step.migration.filename} …")
        run = _apply_transactional if step.migration.transactional else _apply_without_transaction
        try:
            elapsed = run(conn, step, lock_timeout, allow_out_of_order, notify)
        except _Skipped:
            if notify:
                notify(f"{step.migration.filename} was applied by another runner meanwhile")
            continue
        done.append(step.migration)
        if on_applied:
            on_applied(step.migration, elapsed)
    return done


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
    _check_wait(lock_timeout)
    files = discover(directory)
    plan = plan_migrations(
        files, read_ledger(conn), target=target, allow_out_of_order=allow_out_of_order
    )
    steps = prepare(plan)
    if not steps:
        return []
    ensure_ledger(conn, lock_timeout, notify)
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


def baseline(
    conn: psycopg.Connection,
    directory: Path,
    target: int,
    *,
    lock_timeout: float = 60.0,
    notify: Notify | None = None,
) -> list[Migration]:
    """Record every file up to `target` as applied without running it."""
    _check_wait(lock_timeout)
    check_version(target, "--to")
    files = discover(directory)
    if target not in {m.version for m in files}:
        raise BadInput(f"--to {target}: no migration has that version")
    ensure_ledger(conn, lock_timeout, notify)
    wait_for_lease(conn, lock_timeout, notify)
    with conn.transaction():
        _take_lock(conn, lock_timeout, notify)
        ledger = read_ledger(conn)
        problems = _problems(files, ledger)
        if problems:
            raise _refuse(problems)
        applied = {row.version for row in ledger}
        chosen = [m for m in files if m.version <= target and m.version not in applied]
        for m in chosen:
            conn.execute(
                INSERT_LEDGER, (m.version, m.name, m.checksum, 0.0, True, _tree_or_none(m))
            )
        return chosen


def _tree_or_none(migration: Migration) -> str | None:
    try:
        return tree_checksum(migration.sql)
    except sqlsplit.SQLSyntaxError:
        return None


def new_file(directory: Path, name: str) -> Path:
    """Write the next numbered, empty migration file and return its path."""
    if not MIGRATION_NAME.match(name) or len(name) > 200:
        raise BadInput(
            f"migration name {name!r} must be ASCII letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    files = discover(directory)
    highest = max((m.version for m in files), default=0)
    if highest >= MAX_VERSION:
        raise MigrationError(f"version {highest} is the highest a migration can have")
    width = max([4] + [len(m.filename.split("_", 1)[0]) for m in files])
    path = directory / f"{highest + 1:0{width}d}_{name}.sql"
    try:
        with path.open("x", encoding="utf-8"):
            pass
    except FileExistsError:
        raise MigrationError(f"{path.name} already exists") from None
    except OSError as error:
        raise MigrationError(f"cannot write {path}: {error.strerror}") from None
    return path


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
    _check_wait(lock_timeout)
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
    except sqlsplit.SQLSyntaxError as error:
        if not force:
            raise MigrationError(f"{migration.filename}: {error}") from None
        new_tree = None
    ensure_ledger(conn, lock_timeout, notify)
    wait_for_lease(conn, lock_timeout, notify)
    with conn.transaction():
        _take_lock(conn, lock_timeout, notify)
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


def describe_plan(steps: Sequence[Step]) -> list[str]:
    return [
        f"would apply {s.migration.filename}"
        + ("" if s.migration.transactional else "  (no transaction)")
        for s in steps
    ]
