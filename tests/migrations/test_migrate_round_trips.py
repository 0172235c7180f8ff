"""A transactional file is one transaction; errors name the file and the line."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg import pq

from conftest import CLI, direct
from towerctl import db, migrations
from towerctl.errors import ExitCode, MigrationError

pytestmark = pytest.mark.timeout(60)


def write(folder: Path, name: str, body: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(body)


def syncs_during(conn: psycopg.Connection, action: object) -> int:
    """How many times the client waited for the server: one Sync (extended protocol) or
    Query (simple protocol) message each."""
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            action()  # type: ignore[operator]
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return sum(1 for line in trace if re.match(r"F\t[0-9]+\t(Sync|Query)\b", line))


def test_a_pending_file_is_applied_and_up_to_date_is_two_round_trips(
    empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "m"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    conn = db.connect(empty_db_url)
    try:
        migrations.migrate(conn, folder)
        body = "".join(
            f"CREATE TABLE t{i} (id int);\nINSERT INTO t{i} VALUES ({i});\n" for i in range(20)
        )
        write(folder, "0002_b.sql", body)
        assert [m.version for m in migrations.migrate(conn, folder)] == [2]
        # read the ledger: is it there (1), its rows (1)
        assert syncs_during(conn, lambda: migrations.migrate(conn, folder)) == 2
        rows = conn.execute(
            "SELECT version, execution_ms >= 0 FROM tower_schema_migrations ORDER BY 1"
        ).fetchall()
        assert rows == [(1, True), (2, True)]
        assert conn.execute("SELECT count(*) FROM t19").fetchone() == (1,)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        # a runtime error the server gives no position for: found by the failed statement
        ("CREATE TABLE u (id int PRIMARY KEY);\n\nINSERT INTO u VALUES (1);\n"
         "INSERT INTO u\n  VALUES (1);\n", 4, "duplicate key"),
        # an error with a position inside a statement that spans lines
        ("CREATE TABLE v (id int);\nSELECT\n  1,\n  nosuchcolumn\nFROM v;\n", 4, "nosuchcolumn"),
        ("SELECT 1;\nSELECT 1 / 0;\n", 2, "division by zero"),
    ],
)  # fmt: skip
def test_failure_names_file_and_line_and_applies_nothing(
    cli: CLI, empty_db_url: str, tmp_path: Path, body: str, line: int, words: str
) -> None:
    folder = tmp_path / "m"
    write(folder, "0001_bad.sql", body)
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION, result.stderr
    assert f"0001_bad.sql, line {line}:" in result.stderr
    assert words in result.stderr
    assert "nothing of this file was applied" in result.stderr
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT to_regclass('u'), to_regclass('v')").fetchone() == (None, None)
        assert c.execute("SELECT count(*) FROM tower_schema_migrations").fetchone() == (0,)
        # the connection is usable again: the failed transaction was rolled back
    conn = db.connect(empty_db_url)
    try:
        with pytest.raises(MigrationError, match=f"line {line}:"):
            migrations.migrate(conn, folder)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()


def test_a_lock_taken_is_waited_for_naming_the_holder(empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    conn = db.connect(empty_db_url)
    seen: list[str] = []
    try:
        migrations.migrate(conn, folder, target=1)
        # a session lock through a transaction pooler guards nothing: held directly
        with psycopg.connect(direct(empty_db_url), autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (migrations.LOCK_KEY,))
            with pytest.raises(MigrationError, match="held the lock"):
                migrations.migrate(conn, folder, lock_timeout=0.3, notify=seen.append)
        assert any("waiting for another migration runner's lock (pid" in s for s in seen), seen
        assert [m.version for m in migrations.migrate(conn, folder)] == [2]
    finally:
        conn.close()
    assert os.path.isdir(folder)


def test_files_are_applied_in_order_each_named_as_it_starts(
    empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "m"
    for i in range(1, 6):
        write(folder, f"000{i}_t{i}.sql", f"CREATE TABLE t{i} (id int);\n")
    conn = db.connect(empty_db_url)
    seen: list[str] = []
    try:
        migrations.migrate(conn, folder, target=1)
        migrations.migrate(conn, folder, notify=seen.append)
        rows = conn.execute("SELECT version FROM tower_schema_migrations ORDER BY 1").fetchall()
        assert rows == [(1,), (2,), (3,), (4,), (5,)]
        assert conn.info.transaction_status == pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()
    assert seen == [f"applying 000{i}_t{i}.sql …" for i in range(2, 6)]


@pytest.mark.parametrize(
    ("failing", "words"),
    [
        ("CREATE TABLE b (id int);\nSELECT 1 / 0;\n", "line 2: division by zero"),
        # fails at COMMIT (a deferred constraint)
        ("CREATE TABLE p (id int PRIMARY KEY);\n"
         "CREATE TABLE c (p int REFERENCES p DEFERRABLE INITIALLY DEFERRED);\n"
         "INSERT INTO c VALUES (1);\n", "COMMIT failed"),
    ],
)  # fmt: skip
def test_the_file_after_a_failed_one_runs_nothing(
    cli: CLI, empty_db_url: str, tmp_path: Path, failing: str, words: str
) -> None:
    folder = tmp_path / "m"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_bad.sql", failing)
    write(folder, "0003_next.sql", "CREATE TABLE next_one (id int);\n")
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION, result.stderr
    assert f"0002_bad.sql, {words}" in result.stderr or f"0002_bad.sql: {words}" in result.stderr
    assert "nothing of this file was applied" in result.stderr
    assert "applying 0003_next.sql" not in result.stderr
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT to_regclass('next_one'), to_regclass('p')").fetchone() == (
            None,
            None,
        )
        rows = c.execute("SELECT version FROM tower_schema_migrations").fetchall()
        assert rows == [(1,)]


def test_the_run_ends_with_its_commits_on_disk(cli: CLI, tmp_path: Path) -> None:
    """Every file's commit waits for the disk. The WAL writer is slowed (10 s) so that only
    a commit's own wait can flush."""
    import pgserver

    folder = tmp_path / "m"
    for i in range(1, 6):
        write(
            folder,
            f"000{i}_t{i}.sql",
            f"CREATE TABLE t{i} AS SELECT g, current_setting('synchronous_commit') AS commits"
            " FROM generate_series(1, 500) g;\n",
        )
    write(
        folder,
        "0006_mark.sql",
        "CREATE TABLE wal_mark AS SELECT pg_current_wal_insert_lsn() AS lsn,"
        " current_setting('synchronous_commit') AS commits;\n",
    )
    with pgserver.pg_server() as server:
        with server.connect() as admin:
            admin.execute("ALTER SYSTEM SET synchronous_commit = on")  # pgserver's is off
            admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            admin.execute("ALTER SYSTEM SET wal_writer_flush_after = '1GB'")
            admin.execute("SELECT pg_reload_conf()")
        result = cli("--database-url", server.url(), "migrate", "--dir", str(folder))
        assert result.exit_code == ExitCode.OK, result.stderr
        with server.connect() as c:
            row = c.execute(
                "SELECT pg_current_wal_flush_lsn() >= lsn, lsn::text, commits FROM wal_mark"
            ).fetchone()
            earlier = c.execute(
                "SELECT DISTINCT commits FROM t1 UNION SELECT DISTINCT commits FROM t5"
            ).fetchall()
            setting = c.execute("SHOW synchronous_commit").fetchone()
    assert row is not None and row[0] is True, row
    assert row[2] == "on"  # the last file's commit waited for the disk
    assert earlier == [("on",)]  # and so did every file's before it
    assert setting == ("on",)
