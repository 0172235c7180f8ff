"""Transactional files as libpq pipelines: a file's whole transaction (guard, statements,
ledger row, COMMIT, then a Sync) is one round trip, and the next file is queued behind the
running one, so the server never waits for the client between files.

The queued file's guard runs it only when the file before it committed in this session (the
ledger row's statement sets a session mark that an aborted transaction undoes); otherwise it
runs nothing: after a failed file its BEGIN meets the aborted transaction, and after a failed
COMMIT (or on another server connection behind a pooler) its guard refuses.

Straight on libpq: psycopg's pipeline costs about 0.1 ms of client time per statement. While
sending, replies are read too, so neither side waits on a full buffer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from towerctl.db import flush_sent, wait_for_result
from towerctl.migration_ledger import FAST_GUARD, INSERT_LEDGER_TIMED
from towerctl.migration_plan import Step

if TYPE_CHECKING:
    import psycopg
    from psycopg import pq

Query = tuple[bytes, Sequence[bytes | None] | None]

# A pipelined file's commit does not wait for the disk (SET LOCAL: nothing outlives the file's
# transaction, behind a pooler too), except the run's last file: its commit waits for all
# the WAL before it. A server crash mid-run can lose the latest files, each together with
# its ledger row, and the next run applies them again; when a run ends well, everything it
# reported applied is on disk. After a failure the server's WAL writer flushes the files
# reported applied within 3 x wal_writer_delay (0.6 s by default).
ASYNC_COMMIT = b"SET LOCAL synchronous_commit = off"
DURABLE_COMMIT = b"SET LOCAL synchronous_commit TO DEFAULT"
# The messages of a file's pipeline around its own statements: BEGIN, the guard, the
# commit setting, then the ledger row and COMMIT. Index of the file's first statement:
FIRST_STATEMENT = 3
AROUND_STATEMENTS = 5


class FilePipeline:
    def __init__(self, conn: psycopg.Connection, statement_ms: int, allow_out_of_order: bool):
        self.conn = conn
        self.pgconn = conn.pgconn
        self.statement_ms = str(statement_ms).encode()
        self.out_of_order = b"t" if allow_out_of_order else b"f"
        self.encoding = conn.info.encoding  # the connection's, as psycopg would encode
        self.run = os.urandom(8).hex()  # the session mark names this run and the file
        self.in_flight = 0

    def mark(self, step: Step) -> bytes:
        return f"{self.run}:{step.migration.version}".encode()

    def queries(self, step: Step, after: Step | None, durable: bool) -> list[Query]:
        migration = step.migration
        version = str(int(migration.version)).encode()
        guard = (
            version,
            self.out_of_order,
            self.statement_ms,
            self.mark(after) if after is not None else None,
        )
        row = (
            version,
            migration.name.encode(self.encoding),
            migration.checksum.encode(),
            step.tree_checksum.encode(),
            self.mark(step),
        )
        return [
            (b"BEGIN", None),
            (FAST_GUARD.encode(), guard),
            (DURABLE_COMMIT if durable else ASYNC_COMMIT, None),
            *((statement.text.encode(self.encoding), None) for statement in step.statements),
            (INSERT_LEDGER_TIMED.encode(), row),
            (b"COMMIT", None),
        ]

    def send(self, step: Step, after: Step | None = None, *, durable: bool = False) -> None:
        """Queue the file's transaction (one statement per message) and a Sync; `after` is the
        file queued just before it, which must commit first; a `durable` file's commit waits
        for the disk (the run's last)."""
        pgconn = self.pgconn
        if not self.in_flight:
            pgconn.enter_pipeline_mode()
        self.in_flight += 1
        for query, params in self.queries(step, after, durable):
            pgconn.send_query_params(query, params)
        pgconn.pipeline_sync()
        flush_sent(pgconn)

    def receive(self) -> list[pq.abc.PGresult]:
        """The results of the oldest queued file, one per statement sent (fewer only when the
        connection was lost)."""
        from psycopg import pq

        pgconn = self.pgconn
        results: list[pq.abc.PGresult] = []
        idle = False
        try:
            while True:
                wait_for_result(pgconn)
                result = pgconn.get_result()
                if result is None:
                    if idle or pgconn.status != pq.ConnStatus.OK:  # nothing more will come
                        self.in_flight = 0
                        return results
                    idle = True
                    continue
                idle = False
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    self.in_flight -= 1
                    return results
                results.append(result)
        finally:
            if not self.in_flight:
                self.close()

    def close(self) -> None:
        from psycopg import pq

        if self.pgconn.status == pq.ConnStatus.OK and self.pgconn.pipeline_status:
            with contextlib.suppress(Exception):  # the error being raised says more
                self.pgconn.exit_pipeline_mode()


def first_failure(results: Sequence[pq.abc.PGresult], sent: int) -> int:
    """The index of the statement that failed (the rest were skipped), `len(results)` when
    results are missing (a lost connection), or -1 when everything ran."""
    from psycopg import pq

    for index, result in enumerate(results):
        if result.status == pq.ExecStatus.FATAL_ERROR:
            return index
    return len(results) if len(results) < sent else -1
