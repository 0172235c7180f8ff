"""Running planned steps: a transactional file in one transaction, a no-transaction file
statement by statement under its lease."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from towerctl.errors import MigrationError
from towerctl.migration_files import Migration, tree_checksum
from towerctl.migration_ledger import (
    DROP_LEASE,
    FAST_GUARD,
    FAST_PATH_REFUSED,
    INSERT_LEDGER,
    INSERT_LEDGER_TIMED,
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
from towerctl.migration_plan import Step

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq


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
    tree = step.tree_checksum or tree_checksum(migration.sql)
    fast = _apply_in_one_round_trip(conn, step, statement_ms, tree, allow_out_of_order)
    if fast is not None:
        return fast
    while True:
        current = -1
        try:
            with conn.transaction():
                take_lock(conn, wait, notify)
                recheck(conn, migration, allow_out_of_order)
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
        except LeaseBusy:
            wait_for_lease(conn, wait, notify)
        except psycopg.Error as error:
            if current < 0:
                raise
            raise _failure(conn, step, current, error) from None


def _apply_in_one_round_trip(
    conn: psycopg.Connection, step: Step, statement_ms: int, tree: str, allow_out_of_order: bool
) -> float | None:
    """The whole transaction (guard, statements, ledger row, COMMIT) sent as one pipeline: one
    round trip. None when the guard found the lock taken or the ledger changed (nothing ran):
    the caller then takes the step-by-step path."""
    import psycopg
    from psycopg import pq

    migration = step.migration
    guard = (
        str(int(migration.version)).encode(),
        b"t" if allow_out_of_order else b"f",
        str(statement_ms).encode(),
    )
    row = (
        str(int(migration.version)).encode(),
        migration.name.encode(),
        migration.checksum.encode(),
        tree.encode(),
    )
    queries: list[tuple[bytes, Sequence[bytes] | None]] = [
        (b"BEGIN", None),
        (FAST_GUARD.encode(), guard),
        *((statement.text.encode(), None) for statement in step.statements),
        (INSERT_LEDGER_TIMED.encode(), row),
        (b"COMMIT", None),
    ]
    results = _pipeline(conn, queries)
    # After an error the server skips everything up to the Sync (COMMIT too).
    failed = next(
        (i for i, r in enumerate(results) if r.status == pq.ExecStatus.FATAL_ERROR),
        len(results) if len(results) < len(queries) else -1,
    )
    if failed < 0:
        value = results[-2].get_value(0, 0)
        return float(value) if value else 0.0
    if conn.broken:  # the connection was lost (exit 8), whatever the last result said
        message = conn.pgconn.get_error_message(conn.info.encoding) or "connection lost"
        raise psycopg.OperationalError(message)
    if failed < len(results):
        error: Exception = psycopg.errors.error_from_result(
            results[failed], encoding=conn.info.encoding
        )
    else:
        error = psycopg.OperationalError("the server sent fewer results than statements")
    _roll_back(conn)
    if failed == 1 and getattr(error, "sqlstate", None) == FAST_PATH_REFUSED:
        return None
    current = failed - 2
    if not 0 <= current < len(step.statements):
        raise error
    raise _failure(conn, step, current, error) from None


def _pipeline(
    conn: psycopg.Connection, queries: Sequence[tuple[bytes, Sequence[bytes] | None]]
) -> list[pq.abc.PGresult]:
    """Send every query (extended protocol: one statement each, text parameters) and one Sync,
    then read one result per query: one round trip. Straight on libpq (psycopg's pipeline
    costs about 0.1 ms of client time per statement); while sending, replies are read too, so
    neither side waits on a full buffer."""
    from psycopg import pq

    pgconn = conn.pgconn
    results: list[pq.abc.PGresult] = []
    with conn.lock:
        pgconn.enter_pipeline_mode()
        try:
            for query, params in queries:
                pgconn.send_query_params(query, params)
            pgconn.pipeline_sync()
            while pgconn.flush():
                readable, _, _ = select.select([pgconn.socket], [pgconn.socket], [])
                if readable:
                    pgconn.consume_input()
            idle = False
            while True:
                while pgconn.is_busy():
                    select.select([pgconn.socket], [], [])
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    if idle or pgconn.status != pq.ConnStatus.OK:  # nothing more will come
                        return results
                    idle = True
                    continue
                idle = False
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    return results
                results.append(result)
        finally:
            if pgconn.status == pq.ConnStatus.OK and pgconn.pipeline_status:
                with contextlib.suppress(Exception):  # the error being raised says more
                    pgconn.exit_pipeline_mode()


def _roll_back(conn: psycopg.Connection) -> None:
    """End the failed transaction of the fast path (the server keeps it open, aborted)."""
    import psycopg

    if conn.broken or conn.closed:
        return
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        with contextlib.suppress(psycopg.Error):  # the error being raised says more
            conn.execute("ROLLBACK")


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
                    step.tree_checksum or tree_checksum(migration.sql),
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
    check_wait(lock_timeout)
    done: list[Migration] = []
    for step in steps:
        if notify:
            notify(f"applying {step.migration.filename} …")
        run = _apply_transactional if step.migration.transactional else _apply_without_transaction
        try:
            elapsed = run(conn, step, lock_timeout, allow_out_of_order, notify)
        except Skipped:
            if notify:
                notify(f"{step.migration.filename} was applied by another runner meanwhile")
            continue
        done.append(step.migration)
        if on_applied:
            on_applied(step.migration, elapsed)
    return done
