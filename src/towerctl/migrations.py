"""Numbered SQL migrations: discover files, plan against the ledger, apply.

`plan_migrations(files, ledger)` is a pure function: it returns the steps to run
or raises `MigrationError` naming every problem, before anything is applied.
`apply` runs a plan on a connection that holds the migration lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from towerctl.errors import BadInput, MigrationError

if TYPE_CHECKING:
    import psycopg

    from towerctl.sqlsplit import Statement

FILE_NAME = re.compile(r"^(\d+)_([A-Za-z0-9][A-Za-z0-9_.\-]*)\.sql$")
NO_TRANSACTION_MARK = "-- towerctl:no-transaction"
LEDGER_TABLE = "tower_schema_migrations"
LOCK_KEY = 0x746F776572_6D6967  # "tower" "mig"
MAX_LOCK_WAIT_SECONDS = 86_400
TRANSACTION_CONTROL = re.compile(
    r"^(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)

CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    version      bigint PRIMARY KEY,
    name         text NOT NULL,
    checksum     text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now(),
    execution_ms double precision NOT NULL DEFAULT 0,
    baseline     boolean NOT NULL DEFAULT false
)"""
INVALID_INDEXES = """
SELECT i.indexrelid::regclass FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid
WHERE NOT i.indisvalid AND c.relnamespace = current_schema()::regnamespace"""
READ_LEDGER = f"""
SELECT version, name, checksum, applied_at, execution_ms
FROM {LEDGER_TABLE} ORDER BY version"""
INSERT_LEDGER = f"""
INSERT INTO {LEDGER_TABLE} (version, name, checksum, execution_ms, baseline)
VALUES (%s, %s, %s, %s, %s)"""


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


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    state: str  # applied | pending | changed | missing
    checksum: str
    applied_at: datetime | None
    execution_ms: float | None


@dataclass(frozen=True)
class Plan:
    steps: tuple[Migration, ...]
    target: int | None


def checksum(data: bytes) -> str:
    """SHA-256 of a file with CRLF normalised to LF."""
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def default_dir() -> Path:
    """The migrations shipped in the package (or the repository's `sql/` when run from source)."""
    explicit = os.environ.get("TOWER_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    packaged = Path(__file__).parent / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "sql"


def read_migration(path: Path, version: int, name: str) -> Migration:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MigrationError(f"cannot read {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8").replace("\r\n", "\n")
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
    """Every `NNNN_name.sql` in `directory`, ordered by version then file name."""
    if not directory.is_dir():
        raise MigrationError(f"migrations folder not found: {directory}")
    found: list[Migration] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise MigrationError(f"cannot list {directory}: {error.strerror}") from None
    for path in entries:
        if not path.name.endswith(".sql"):
            continue
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(
                f"{path.name} is not named like NNNN_name.sql",
                hint="rename it or move it out of the migrations folder",
            )
        if not path.is_file():
            raise MigrationError(f"{path.name} is not a regular file")
        found.append(read_migration(path, int(match.group(1)), match.group(2)))
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
                "write a new migration instead of editing an applied one"
            )
    return problems


def plan_migrations(
    files: Sequence[Migration],
    ledger: Sequence[AppliedMigration],
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
) -> Plan:
    """The files to apply, in order; raises `MigrationError` when the state is unsafe."""
    problems = _problems(files, ledger)
    applied = {row.version for row in ledger}
    pending = [m for m in files if m.version not in applied]
    highest = max(applied, default=None)
    if highest is not None and not allow_out_of_order:
        late = [m for m in pending if m.version < highest]
        for m in late:
            problems.append(
                f"{m.filename} is pending but version {highest} is already applied "
                "(out of order; use --allow-out-of-order to apply it anyway)"
            )
    if target is not None and target not in {m.version for m in files} | applied:
        problems.append(f"--to {target}: no migration has that version")
    if problems:
        raise MigrationError(
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems: " + "; ".join(problems)
        )
    steps = tuple(m for m in pending if target is None or m.version <= target)
    return Plan(steps=steps, target=target)


def status(files: Sequence[Migration], ledger: Sequence[AppliedMigration]) -> list[MigrationState]:
    """Every version known to the files or the ledger, with its state."""
    rows = {row.version: row for row in ledger}
    states: list[MigrationState] = []
    for m in files:
        row = rows.get(m.version)
        if row is None:
            states.append(MigrationState(m.version, m.name, "pending", m.checksum, None, None))
        else:
            state = "applied" if row.checksum == m.checksum else "changed"
            states.append(
                MigrationState(
                    m.version, m.name, state, m.checksum, row.applied_at, row.execution_ms
                )
            )
    file_versions = {m.version for m in files}
    for row in ledger:
        if row.version not in file_versions:
            states.append(
                MigrationState(
                    row.version, row.name, "missing", row.checksum, row.applied_at, row.execution_ms
                )
            )
    states.sort(key=lambda s: s.version)
    return states


# --- the database side -------------------------------------------------------


def read_ledger(conn: psycopg.Connection) -> list[AppliedMigration]:
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (LEDGER_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return []
    return [AppliedMigration(*row) for row in conn.execute(READ_LEDGER).fetchall()]


@contextmanager
def migration_lock(conn: psycopg.Connection, timeout_seconds: float) -> Iterator[None]:
    """Hold the session-level advisory lock that serialises migration runners."""
    import psycopg

    if not 0 <= timeout_seconds <= MAX_LOCK_WAIT_SECONDS:
        raise BadInput(f"--lock-timeout must be from 0 to {MAX_LOCK_WAIT_SECONDS} seconds")
    refused = MigrationError(
        f"another migration run held the lock for more than {timeout_seconds:g}s",
        hint="wait for it to finish or raise --lock-timeout",
    )
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
    if not (row and row[0]):
        if timeout_seconds == 0:
            raise refused
        conn.execute(f"SET lock_timeout = '{max(int(timeout_seconds * 1000), 1)}ms'")
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        except psycopg.errors.LockNotAvailable:
            raise refused from None
        finally:
            if not conn.broken:
                conn.execute("SET lock_timeout = DEFAULT")
    try:
        conn.execute(CREATE_LEDGER)
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))


def _statements(migration: Migration) -> list[Statement]:
    from towerctl.sqlsplit import UnterminatedSQL, split_statements

    try:
        statements = split_statements(migration.sql)
    except UnterminatedSQL as error:
        raise MigrationError(f"{migration.filename}, line {error.line}: {error}") from None
    for statement in statements:
        if TRANSACTION_CONTROL.match(statement.text):
            raise MigrationError(
                f"{migration.filename}, line {statement.line}: transaction control "
                f"({statement.text.split()[0].upper()}) is not allowed; towerctl runs each "
                "file in one transaction",
                hint=f"remove it, or make the first line '{NO_TRANSACTION_MARK}'",
            )
    return statements


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


def _failure(
    conn: psycopg.Connection, migration: Migration, statement: Statement, error: Exception
) -> Exception:
    """The error to raise for a failed statement: the connection's own loss passes through
    (exit 8); anything else names the file and the line (exit 7)."""
    from towerctl.db import first_line

    if conn.broken or conn.closed:
        return error

    diag = getattr(error, "diag", None)
    position = getattr(diag, "statement_position", None)
    line = statement.line_of(int(position)) if position else statement.line
    return MigrationError(
        f"{migration.filename}, line {line}: {first_line(error)}",
        hint="nothing of this file was applied"
        if migration.transactional
        else "no-transaction file: statements before this one stay applied",
    )


def apply_one(conn: psycopg.Connection, migration: Migration) -> float:
    """Apply one file and record it; returns its execution time in milliseconds."""
    import psycopg

    from towerctl.sqlsplit import Statement

    statements = _statements(migration)
    started = time.perf_counter()
    if migration.transactional:
        current = statements[0] if statements else Statement("", 1)
        try:
            with conn.transaction():
                for current in statements:
                    conn.execute(current.text)
                elapsed = (time.perf_counter() - started) * 1000
                conn.execute(
                    INSERT_LEDGER,
                    (migration.version, migration.name, migration.checksum, elapsed, False),
                )
        except psycopg.Error as error:
            raise _failure(conn, migration, current, error) from None
        return elapsed
    for current in statements:
        try:
            conn.execute(current.text)
        except psycopg.Error as error:
            raise _failure(conn, migration, current, error) from None
    invalid = conn.execute(INVALID_INDEXES).fetchall()
    if invalid:
        names = ", ".join(str(row[0]) for row in invalid)
        raise MigrationError(
            f"{migration.filename}: invalid index {names} (left by an interrupted "
            "CREATE INDEX CONCURRENTLY); not recorded",
            hint=f"DROP INDEX CONCURRENTLY {invalid[0][0]}; then run towerctl migrate again",
        )
    elapsed = (time.perf_counter() - started) * 1000
    conn.execute(
        INSERT_LEDGER, (migration.version, migration.name, migration.checksum, elapsed, False)
    )
    return elapsed


def apply(
    conn: psycopg.Connection,
    plan: Plan,
    on_applied: Callable[[Migration, float], None] | None = None,
) -> list[Migration]:
    """Apply every step of `plan` in order, stopping at the first failure.

    Statements wait at most `statement_lock_timeout()` for a table lock.
    """
    done: list[Migration] = []
    if not plan.steps:
        return done
    conn.execute(f"SET lock_timeout = '{int(statement_lock_timeout() * 1000)}ms'")
    try:
        for migration in plan.steps:
            elapsed = apply_one(conn, migration)
            done.append(migration)
            if on_applied:
                on_applied(migration, elapsed)
    finally:
        if not conn.broken and not conn.closed:
            conn.execute("RESET lock_timeout")
    return done


def migrate(
    conn: psycopg.Connection,
    directory: Path,
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
    lock_timeout: float = 60.0,
    on_applied: Callable[[Migration, float], None] | None = None,
) -> list[Migration]:
    """Lock, re-read the ledger, plan and apply: the whole of `towerctl migrate`."""
    files = discover(directory)
    with migration_lock(conn, lock_timeout):
        plan = plan_migrations(
            files, read_ledger(conn), target=target, allow_out_of_order=allow_out_of_order
        )
        return apply(conn, plan, on_applied)


def baseline(
    conn: psycopg.Connection, directory: Path, target: int, *, lock_timeout: float = 60.0
) -> list[Migration]:
    """Record every file up to `target` as applied without running it."""
    files = discover(directory)
    with migration_lock(conn, lock_timeout):
        ledger = read_ledger(conn)
        problems = _problems(files, ledger)
        if problems:
            raise MigrationError("; ".join(problems))
        if target not in {m.version for m in files}:
            raise MigrationError(f"--to {target}: no migration has that version")
        applied = {row.version for row in ledger}
        chosen = [m for m in files if m.version <= target and m.version not in applied]
        with conn.transaction():
            for m in chosen:
                conn.execute(INSERT_LEDGER, (m.version, m.name, m.checksum, 0.0, True))
        return chosen
