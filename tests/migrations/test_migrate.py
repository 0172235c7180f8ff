"""`towerctl migrate` against real PostgreSQL, driven as an operator types it."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest

from conftest import CLI, direct
from towerctl import migrations
from towerctl.errors import ExitCode


def write(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(body)
    return path


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
    return {r[0] for r in rows if not r[0].startswith("tower_schema_migration")}


def ledger_versions(url: str) -> list[int]:
    with psycopg.connect(url) as c:
        return [r[0] for r in c.execute("SELECT version FROM tower_schema_migrations ORDER BY 1")]


def test_packaged_migrations_apply_once_and_report_up_to_date(cli: CLI, empty_db_url: str) -> None:
    first = cli("--database-url", empty_db_url, "migrate")
    assert first.exit_code == ExitCode.OK, first.stderr
    assert "applied 0008_session_messages.sql" in first.stderr
    assert {"sessions", "session_requests", "balance_ledger", "session_messages"} <= tables(
        empty_db_url
    )
    again = cli("--database-url", empty_db_url, "migrate")
    assert again.exit_code == ExitCode.OK
    assert "up to date" in again.stderr
    status = cli("--database-url", empty_db_url, "migrate", "status", "--json", "--check")
    assert status.exit_code == ExitCode.OK
    doc = json.loads(status.stdout)
    assert doc["upToDate"] is True
    shipped = sorted(migrations.default_dir().glob("*.sql"))
    versions = [int(path.name.split("_", 1)[0]) for path in shipped]
    assert [m["version"] for m in doc["migrations"]] == versions
    entry = doc["migrations"][7]
    assert set(entry) >= {"version", "name", "state", "checksum", "appliedAt", "executionMs"}
    assert entry["name"] == "session_messages" and entry["state"] == "applied"
    assert len(entry["checksum"]) == 64 and entry["appliedAt"].endswith("Z")
    with psycopg.connect(empty_db_url) as c:  # 0011's write, dropped by 0015
        dead = "SELECT count(*) FROM pg_proc WHERE proname = 'towerctl_record_request'"
        assert c.execute(dead).fetchone() == (0,)


def test_failing_file_leaves_no_trace_and_names_file_and_line(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_ok.sql", "CREATE TABLE ok_table (id int);\n")
    write(
        folder,
        "0002_broken.sql",
        "CREATE TABLE half_done (id int);\n\nSELECT *\n  FROM no_such_table;\n",
    )
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    assert "0002_broken.sql, line 4" in result.stderr
    assert "no_such_table" in result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("towerctl:")] == [
        result.stderr.strip().splitlines()[-1]
    ]
    assert "ok_table" in tables(empty_db_url)
    assert "half_done" not in tables(empty_db_url)
    assert ledger_versions(empty_db_url) == [1]
    # Fix the file: the next run applies it; there is no "dirty" state to clear.
    write(folder, "0002_broken.sql", "CREATE TABLE half_done (id int);\n")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    assert ledger_versions(empty_db_url) == [1, 2]


def test_runtime_error_without_position_names_the_statement_line(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(
        folder,
        "0001_data.sql",
        "CREATE TABLE t (id int PRIMARY KEY);\nINSERT INTO t VALUES (1);\n"
        "-- the next one collides\nINSERT INTO t VALUES (1);\n",
    )
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    assert "0001_data.sql, line 4" in result.stderr
    assert "t" not in tables(empty_db_url)


def test_no_transaction_file_builds_index_concurrently(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_t.sql", "CREATE TABLE t (id int);\n")
    write(
        folder,
        "0002_idx.sql",
        "-- towerctl:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_id_idx ON t (id);\n",
    )
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.OK, result.stderr
    with psycopg.connect(empty_db_url) as c:
        valid = c.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_id_idx'::regclass"
        ).fetchone()
    assert valid == (True,)
    assert ledger_versions(empty_db_url) == [1, 2]


def test_concurrently_in_a_transactional_file_fails_cleanly(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(
        folder, "0001_t.sql", "CREATE TABLE t (id int);\nCREATE INDEX CONCURRENTLY i ON t (id);\n"
    )
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    assert "0001_t.sql, line 2" in result.stderr
    assert "t" not in tables(empty_db_url)


def test_drift_missing_and_status_check(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    one = write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    # CRLF line endings alone are not drift.
    one.write_bytes(b"CREATE TABLE a (id int);\r\n")
    check = cli(
        "--database-url", empty_db_url, "migrate", "status", "--dir", str(folder), "--check"
    )
    assert check.exit_code == ExitCode.OK
    one.write_text("CREATE TABLE a (id bigint);\n")
    write(folder, "0003_c.sql", "CREATE TABLE c (id int);\n")
    refused = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert refused.exit_code == ExitCode.MIGRATION
    assert "0001_a.sql changed" in refused.stderr
    # The hint is a command that works as copied: it names the folder.
    assert f"'towerctl migrate repair 1 --dir {folder}'" in refused.stderr
    assert "c" not in tables(empty_db_url), "nothing may be applied when drift is found"
    status = cli(
        "--database-url", empty_db_url, "migrate", "status", "--dir", str(folder), "--json"
    )
    states = {m["version"]: m["state"] for m in json.loads(status.stdout)["migrations"]}
    assert states == {1: "changed", 2: "applied", 3: "pending"}
    check = cli(
        "--database-url", empty_db_url, "migrate", "status", "--dir", str(folder), "--check"
    )
    assert check.exit_code == ExitCode.MIGRATION
    one.write_text("CREATE TABLE a (id int);\n")
    (folder / "0002_b.sql").unlink()
    missing = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert missing.exit_code == ExitCode.MIGRATION
    assert "missing" in missing.stderr


def test_duplicate_versions_are_refused_naming_both(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0008_session_messages.sql", "CREATE TABLE m (id int);\n")
    write(folder, "0008_session_tags.sql", "CREATE TABLE g (id int);\n")
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    assert "0008_session_messages.sql" in result.stderr
    assert "0008_session_tags.sql" in result.stderr
    assert "a" not in tables(empty_db_url)


def test_out_of_order_refused_then_allowed(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0003_c.sql", "CREATE TABLE c (id int);\n")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    refused = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert refused.exit_code == ExitCode.MIGRATION
    assert "0002_b.sql" in refused.stderr and "out of order" in refused.stderr
    allowed = cli(
        "--database-url", empty_db_url, "migrate", "--dir", str(folder), "--allow-out-of-order"
    )
    assert allowed.exit_code == ExitCode.OK
    assert ledger_versions(empty_db_url) == [1, 2, 3]


def test_dry_run_and_to(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    for n in (1, 2, 3):
        write(folder, f"000{n}_t{n}.sql", f"CREATE TABLE t{n} (id int);\n")
    dry = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "--dry-run")
    assert dry.exit_code == ExitCode.OK
    assert dry.stdout.splitlines() == [f"would apply 000{n}_t{n}.sql" for n in (1, 2, 3)]
    assert tables(empty_db_url) == set()
    upto = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "--to", "2")
    assert upto.exit_code == ExitCode.OK
    assert ledger_versions(empty_db_url) == [1, 2]
    bad = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "--to", "9")
    assert bad.exit_code == ExitCode.BAD_INPUT


def test_baseline_records_without_running(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    write(folder, "0003_c.sql", "CREATE TABLE c (id int);\n")
    result = cli(
        "--database-url", empty_db_url, "migrate", "baseline", "--dir", str(folder), "--to", "2"
    )
    assert result.exit_code == ExitCode.OK, result.stderr
    assert tables(empty_db_url) == set()
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    assert tables(empty_db_url) == {"c"}


def test_lock_timeout_exits_7(cli: CLI, empty_db_url: str) -> None:
    with psycopg.connect(direct(empty_db_url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations.LOCK_KEY,))
        result = cli("--database-url", empty_db_url, "migrate", "--lock-timeout", "0.3")
    assert result.exit_code == ExitCode.MIGRATION
    assert "lock" in result.stderr
    assert "sessions" not in tables(empty_db_url)


def test_concurrent_runners_apply_each_file_once(empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_slow.sql", "SELECT pg_sleep(0.3);\nCREATE TABLE once (id int);\n")
    write(folder, "0002_count.sql", "CREATE TABLE runs (n int);\nINSERT INTO runs VALUES (1);\n")
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            with psycopg.connect(empty_db_url, autocommit=True) as c:
                migrations.migrate(c, folder)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=runner) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(empty_db_url) as c:
        assert c.execute("SELECT count(*) FROM runs").fetchone() == (1,)
    assert ledger_versions(empty_db_url) == [1, 2]


def test_unreachable_database_exits_8_without_password(cli: CLI) -> None:
    url = "postgresql://operator:s3cretpassw0rd@127.0.0.1:1/tower"
    result = cli("--database-url", url, "migrate")
    assert result.exit_code == ExitCode.UNREACHABLE
    assert "s3cretpassw0rd" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1
    assert "127.0.0.1:1" in result.stderr


def test_garbage_database_url_exits_8(cli: CLI) -> None:
    result = cli("--database-url", "host=x password=hunter2 =broken", "migrate", "status")
    assert result.exit_code == ExitCode.UNREACHABLE
    assert "hunter2" not in result.stderr


def test_dir_with_odd_files(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_bin.sql", "x")
    (folder / "0001_bin.sql").write_bytes(b"\xff\xfe\x00")
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    missing = cli("--database-url", empty_db_url, "migrate", "--dir", str(tmp_path / "none"))
    assert missing.exit_code == ExitCode.BAD_INPUT
    assert tables(empty_db_url) == set()


@pytest.mark.parametrize("args", [["--to", "x"], ["--lock-timeout", "soon"], ["--nope"]])
def test_bad_flags_exit_2(cli: CLI, args: list[str]) -> None:
    assert cli("migrate", *args).exit_code == ExitCode.BAD_INPUT


def test_lost_connection_mid_file_exits_8(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_slow.sql", "CREATE TABLE a (id int);\nSELECT pg_sleep(5);\n")

    def terminate() -> None:
        with psycopg.connect(empty_db_url, autocommit=True) as c:
            for _ in range(100):
                killed = c.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND query LIKE '%pg_sleep%'"
                ).fetchall()
                if killed:
                    return
                threading.Event().wait(0.05)

    killer = threading.Thread(target=terminate)
    killer.start()
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    killer.join()
    assert result.exit_code == ExitCode.UNREACHABLE, result.stderr
    assert "lost the database connection" in result.stderr
    assert "a" not in tables(empty_db_url)


def test_invalid_index_from_an_interrupted_concurrent_build_is_reported(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_t.sql", "CREATE TABLE t (id int);\nINSERT INTO t VALUES (1), (1);\n")
    write(
        folder,
        "0002_idx.sql",
        "-- towerctl:no-transaction\n"
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_u ON t (id);\n",
    )
    failed = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert failed.exit_code == ExitCode.MIGRATION  # duplicate key: the build fails, index invalid
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        c.execute("DELETE FROM t WHERE ctid = (SELECT max(ctid) FROM t)")
    again = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert again.exit_code == ExitCode.MIGRATION
    assert "invalid index t_u" in again.stderr and "DROP INDEX CONCURRENTLY t_u" in again.stderr
    assert ledger_versions(empty_db_url) == [1]
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        c.execute("DROP INDEX CONCURRENTLY t_u")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    assert ledger_versions(empty_db_url) == [1, 2]


@pytest.mark.parametrize(
    "control", ["BEGIN;", "COMMIT;", "start transaction;", "END;", "rollback;"]
)
def test_transaction_control_in_a_file_is_refused_before_running(
    cli: CLI, empty_db_url: str, tmp_path: Path, control: str
) -> None:
    folder = tmp_path / "sql"
    write(
        folder, "0001_a.sql", f"CREATE TABLE t1 (id int);\n{control}\nCREATE TABLE t2 (id int);\n"
    )
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    assert "0001_a.sql, line 2" in result.stderr and "transaction control" in result.stderr
    assert tables(empty_db_url) == set()


def test_lock_timeout_zero_fails_at_once_and_bounds_are_checked(
    cli: CLI, empty_db_url: str
) -> None:
    with psycopg.connect(direct(empty_db_url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations.LOCK_KEY,))
        result = cli("--database-url", empty_db_url, "migrate", "--lock-timeout", "0")
    assert result.exit_code == ExitCode.MIGRATION
    for bad in ("inf", "1e12", "-1", "nan"):
        assert cli("--database-url", empty_db_url, "migrate", "--lock-timeout", bad).exit_code == 2


def test_ddl_waits_at_most_the_statement_lock_timeout(
    cli: CLI, empty_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_t.sql", "CREATE TABLE t (id int);\n")
    write(folder, "0002_alter.sql", "ALTER TABLE t ADD COLUMN note text;\n")
    assert (
        cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "--to", "1").exit_code
        == 0
    )
    monkeypatch.setenv("TOWER_MIGRATION_LOCK_TIMEOUT", "0.3")
    # a long transaction holding a lock on t
    with psycopg.connect(empty_db_url, application_name="report-job") as reader:
        reader.execute("SELECT * FROM t")
        # the server's pid (behind a pooler the client's is the pooler's own)
        holder = reader.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.MIGRATION
    assert "0002_alter.sql, line 1: waited 0.3s for a table lock" in result.stderr
    # The blocker is named, and which setting to raise.
    assert f"held by pid {holder} (report-job, idle in transaction since " in result.stderr
    assert "TOWER_MIGRATION_LOCK_TIMEOUT" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "towerctl:" in line]) == 1
    assert ledger_versions(empty_db_url) == [1]


def test_unmigrated_database_says_so(cli: CLI, empty_db_url: str) -> None:
    result = cli("--database-url", empty_db_url, "session", "list")
    assert result.exit_code == ExitCode.MIGRATION
    assert "towerctl migrate" in result.stderr


def test_malformed_url_never_echoes_the_password(cli: CLI) -> None:
    for url in ("postgresql://u:Sup3rSecret%zz@localhost/db", "postgresql://u:my secret@h/db"):
        result = cli("--database-url", url, "migrate", "status")
        assert result.exit_code == ExitCode.UNREACHABLE
        assert "Sup3rSecret" not in result.stderr and "my secret" not in result.stderr


# --- operator messages, status, new and repair ----------------------------------


@pytest.mark.timeout(60)
def test_names_each_file_before_running_it(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    result = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.OK
    lines = result.stderr.splitlines()
    assert lines[:4] == [
        "applying 0001_a.sql …",
        lines[1],
        "applying 0002_b.sql …",
        lines[3],
    ]
    assert lines[1].startswith("applied 0001_a.sql (") and lines[3].startswith("applied 0002_b")


@pytest.mark.timeout(60)
def test_lock_wait_names_the_holder_and_times_out(cli: CLI, empty_db_url: str) -> None:
    with psycopg.connect(direct(empty_db_url)) as holder:  # a transaction holding the lock
        holder.execute("SET application_name = 'other-runner'")
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.LOCK_KEY,))
        pid = holder.info.backend_pid
        result = cli("--database-url", empty_db_url, "migrate", "--lock-timeout", "0.3")
    assert result.exit_code == ExitCode.MIGRATION
    assert (
        f"waiting for another migration runner's lock (pid {pid}, application other-runner,"
        in result.stderr
    )
    assert "held the lock for more than 0.3s" in result.stderr
    assert "sessions" not in tables(empty_db_url)


@pytest.mark.timeout(60)
def test_lease_wait_names_the_holder(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        c.execute(
            "INSERT INTO tower_schema_migration_lease (token, version, file, owner,"
            " application_name, deadline) VALUES ('t', 2, '0002_idx.sql', 'pid 42 on host',"
            " 'other', now() + interval '1 hour')"
        )
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    result = cli(
        "--database-url", empty_db_url, "migrate", "--dir", str(folder), "--lock-timeout", "0.3"
    )
    assert result.exit_code == ExitCode.MIGRATION
    assert "waiting for another migration runner (0002_idx.sql by pid 42 on host" in result.stderr
    assert ledger_versions(empty_db_url) == [1]
    with psycopg.connect(empty_db_url, autocommit=True) as c:  # an expired lease frees itself
        c.execute("UPDATE tower_schema_migration_lease SET deadline = now() - interval '1 s'")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    assert ledger_versions(empty_db_url) == [1, 2]


@pytest.mark.timeout(60)
def test_group_options_status_and_doctor_dir(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_b.sql", "CREATE TABLE b (id int);\n")
    write(folder, "0003_c.sql", "CREATE TABLE c (id int);\n")
    base = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "--to", "1",
               "baseline")  # fmt: skip
    assert base.exit_code == ExitCode.OK, base.stderr
    assert (
        cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "--to", "2").exit_code
        == 0
    )
    (folder / "0002_b.sql").write_text("CREATE TABLE b (id bigint);\n")
    write(folder, "0003_d.sql", "SELECT 1;\n")
    shown = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "status")
    assert shown.exit_code == ExitCode.OK, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "STATE", "APPLIED", "AT", "NAME"]
    assert lines[1].split()[:2] == ["1", "applied"] and lines[1].endswith("0001_a.sql  (baseline)")
    assert lines[2].split()[:2] == ["2", "changed"]
    assert [ln.split()[1] for ln in lines[3:5]] == ["duplicate", "duplicate"]
    assert lines[-1] == "4 migrations: 1 applied, 1 changed, 2 duplicate"
    doc = json.loads(
        cli(
            "--database-url", empty_db_url, "migrate", "--dir", str(folder), "status", "--json"
        ).stdout
    )
    one, two = doc["migrations"][0], doc["migrations"][1]
    assert one["baseline"] is True and two["baseline"] is False
    assert two["state"] == "changed" and two["checksum"] != two["fileChecksum"]
    assert two["fileChecksum"] == migrations.checksum((folder / "0002_b.sql").read_bytes())
    refused = cli("--database-url", empty_db_url, "migrate", "--dry-run", "status")
    assert refused.exit_code == ExitCode.BAD_INPUT
    doctor = cli("--database-url", empty_db_url, "doctor", "--dir", str(folder), "--json")
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert "version 2 changed" in checks["migrations_match_files"]["detail"]
    assert "version 3 duplicate" in checks["migrations_match_files"]["detail"]


@pytest.mark.timeout(60)
def test_new_writes_the_next_empty_file(cli: CLI, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0007_a.sql", "SELECT 1;\n")
    result = cli("migrate", "--dir", str(folder), "new", "add_tags")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == f"{folder / '0008_add_tags.sql'}\n"
    assert (folder / "0008_add_tags.sql").read_text() == ""
    assert cli("migrate", "new", "bad name;", "--dir", str(folder)).exit_code == ExitCode.BAD_INPUT
    missing = cli("migrate", "new", "x", "--dir", str(tmp_path / "nope"))
    assert missing.exit_code == ExitCode.BAD_INPUT


@pytest.mark.timeout(60)
def test_repair_accepts_cosmetic_changes_only_unless_forced(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    path = write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    old = migrations.checksum(path.read_bytes())
    path.write_text("-- the sessions table\ncreate table A (\n    ID INT\n);\n")
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 7
    fixed = cli("--database-url", empty_db_url, "migrate", "repair", "1", "--dir", str(folder))
    assert fixed.exit_code == ExitCode.OK, fixed.stderr
    assert "cosmetic" in fixed.stderr
    assert cli("--database-url", empty_db_url, "migrate", "--dir", str(folder)).exit_code == 0
    path.write_text("CREATE TABLE a (id bigint);\n")
    refused = cli("--database-url", empty_db_url, "migrate", "--dir", str(folder), "repair", "1")
    assert refused.exit_code == ExitCode.MIGRATION and "not cosmetic" in refused.stderr
    unconfirmed = cli("--database-url", empty_db_url, "migrate", "repair", "1", "--dir",
                      str(folder), "--force")  # fmt: skip
    assert unconfirmed.exit_code == ExitCode.BAD_INPUT
    forced = cli("--database-url", empty_db_url, "migrate", "repair", "1", "--dir", str(folder),
                 "--force", "--yes")  # fmt: skip
    assert forced.exit_code == ExitCode.OK, forced.stderr
    with psycopg.connect(empty_db_url) as c:
        rows = c.execute(
            "SELECT old_checksum, forced FROM tower_schema_migration_repairs ORDER BY repaired_at"
        ).fetchall()
    assert [r[1] for r in rows] == [False, True] and rows[0][0] == old
    check = cli(
        "--database-url", empty_db_url, "migrate", "status", "--dir", str(folder), "--check"
    )
    assert check.exit_code == ExitCode.OK


def _bare_migrate(env: dict[str, str]) -> tuple[int, str, str]:
    """`towerctl migrate` alone, as a deploy runs it: exit code, stdout, stderr."""
    import os
    import subprocess
    import sys

    towerctl = Path(sys.executable).with_name("towerctl")
    done = subprocess.run(
        [str(towerctl), "migrate"],
        env={**os.environ, **env},
        cwd=env["TOWER_HOME"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stdout, done.stderr


@pytest.mark.timeout(180)
def test_a_bare_migrate_says_up_to_date_applies_and_refuses_in_one_line(
    empty_db_url: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {"TOWER_DATABASE_URL": empty_db_url, "TOWER_HOME": str(home), "NO_COLOR": "1"}
    code, out, err = _bare_migrate(env)  # a fresh database: every file is applied
    assert code == ExitCode.OK and "applied" in err, err
    code, out, err = _bare_migrate(env)
    assert (code, out, err) == (ExitCode.OK, "", "up to date: nothing to apply\n")
    folder = tmp_path / "more"
    folder.mkdir()
    for packaged in migrations.default_dir().glob("*.sql"):
        write(folder, packaged.name, packaged.read_text())
    write(folder, "9001_more.sql", "CREATE TABLE more_things (id int);\n")
    code, out, err = _bare_migrate({**env, "TOWER_MIGRATIONS_DIR": str(folder)})
    assert code == ExitCode.OK and "applied 9001_more.sql" in err, err
    (folder / "9001_more.sql").write_text("CREATE TABLE more_things (id bigint);\n")  # drift
    code, out, err = _bare_migrate({**env, "TOWER_MIGRATIONS_DIR": str(folder)})
    assert code == ExitCode.MIGRATION and err.count("\n") == 1 and "9001_more.sql" in err, err
    bad = {**env, "TOWER_DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/none"}
    code, out, err = _bare_migrate(bad)
    assert code == ExitCode.UNREACHABLE and err.count("\n") == 1 and "secret" not in err, err
