"""`towerctl migrate lint`: the rules against a live catalog, accepted findings, the outputs
and exit codes, and reading a big migration file in linear time."""

from __future__ import annotations

import gc
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import CLI
from towerctl import migrations
from towerctl.cli.findings import write_findings
from towerctl.errors import ExitCode


def data_migration(statements: int) -> str:
    """A data migration of `statements` INSERTs (about 1 KB each), with comments between."""
    pad = "x" * 900
    return "".join(
        f"-- batch {i}\nINSERT INTO bulk (id, label, payload) VALUES ({i}, 'l;{i}', '{pad}');\n"
        for i in range(statements)
    )


def prepared_plan(folder: Path, statements: int) -> migrations.Plan:
    path = folder / f"{statements:06d}_data.sql"
    path.write_text(data_migration(statements))
    return migrations.plan_migrations([migrations.read_migration(path, statements, "data")], [])


def check_time(plan: migrations.Plan, statements: int) -> float:
    """CPU time of one reading of the file as a run reads it (parse, checks, lint facts), with
    the collector paused so a collection of the other reading's garbage is not charged to it."""
    gc.collect()
    gc.disable()
    try:
        started = time.process_time()
        (step,) = migrations.prepare(plan)
        spent = time.process_time() - started
    finally:
        gc.enable()
    assert step.statements[-1].line == 2 * statements  # numbered in the same single pass
    return spent


def test_reading_a_file_grows_linearly_with_its_size(tmp_path: Path) -> None:
    # The readings alternate and the fastest of each is kept, so a busy machine (the suite
    # shares it with other servers) slows both sizes alike instead of one of them.
    small_plan = prepared_plan(tmp_path, 4_000)  # about 4 MB
    large_plan = prepared_plan(tmp_path, 16_000)  # about 16 MB: 4x
    small, large = float("inf"), float("inf")
    for _ in range(5):
        small = min(small, check_time(small_plan, 4_000))
        large = min(large, check_time(large_plan, 16_000))
    assert large / small <= 5, f"4x the size took {large / small:.1f}x the time"


# --- the rules against a live catalog ---------------------------------------------------------

NO_TX = "-- towerctl:no-transaction\n"


@dataclass(frozen=True)
class Case:
    rule: str
    risky: str  # on table {t}
    safe: str  # the safe alternative, on table {t}
    no_transaction: bool = False  # the statements need a file of their own
    safe_no_transaction: bool = False


CASES = [
    Case("index-not-concurrent", "CREATE INDEX {t}_a_ix ON {t} (a);",
         "CREATE INDEX CONCURRENTLY IF NOT EXISTS {t}_a_ix ON {t} (a);", safe_no_transaction=True),
    Case("column-type-change", "ALTER TABLE {t} ALTER COLUMN a TYPE bigint;",
         "ALTER TABLE {t} ADD COLUMN a_wide bigint;"),
    Case("set-not-null", "ALTER TABLE {t} ALTER COLUMN a SET NOT NULL;",
         "ALTER TABLE {t} ADD CONSTRAINT {t}_a_nn CHECK (a IS NOT NULL) NOT VALID;"),
    Case("add-column-not-null", "ALTER TABLE {t} ADD COLUMN c int NOT NULL;",
         "ALTER TABLE {t} ADD COLUMN c int NOT NULL DEFAULT 0;"),
    Case("check-without-not-valid", "ALTER TABLE {t} ADD CONSTRAINT {t}_a_pos CHECK (a >= 0);",
         "ALTER TABLE {t} ADD CONSTRAINT {t}_a_pos CHECK (a >= 0) NOT VALID;"),
    Case("foreign-key-without-not-valid",
         "ALTER TABLE {t} ADD CONSTRAINT {t}_fk FOREIGN KEY (a) REFERENCES parent (id);",
         "ALTER TABLE {t} ADD CONSTRAINT {t}_fk FOREIGN KEY (a) REFERENCES parent (id) NOT VALID;"),
    Case("unique-in-place", "ALTER TABLE {t} ADD CONSTRAINT {t}_a_uq UNIQUE (a);",
         "ALTER TABLE {t} ADD CONSTRAINT {t}_a_uq UNIQUE USING INDEX {t}_a_uix;"),
    Case("volatile-default", "ALTER TABLE {t} ADD COLUMN r float8 DEFAULT random();",
         "ALTER TABLE {t} ADD COLUMN r timestamptz DEFAULT now();"),
    Case("drop-column", "ALTER TABLE {t} DROP COLUMN b;",
         "COMMENT ON COLUMN {t}.b IS 'unused: dropped in a later release';"),
    Case("drop-not-null", "ALTER TABLE {t} ALTER COLUMN b DROP NOT NULL;",
         "ALTER TABLE {t} ALTER COLUMN b SET DEFAULT 'none';"),
    Case("drop-table", "DROP TABLE {t};", "COMMENT ON TABLE {t} IS 'retired';"),
    Case("rename-column", "ALTER TABLE {t} RENAME COLUMN b TO b2;",
         "ALTER TABLE {t} ADD COLUMN b2 text;"),
    Case("rename-table", "ALTER TABLE {t} RENAME TO {t}_old;",
         "CREATE VIEW {t}_v AS SELECT * FROM {t};"),
    Case("lock-timeout-missing", "ALTER TABLE {t} ADD COLUMN d int;",
         "SET lock_timeout = '5s';\nALTER TABLE {t} ADD COLUMN d int;"),
    Case("vacuum-full", "VACUUM FULL {t};", "VACUUM {t};", True, True),
    Case("cluster", "CLUSTER {t} USING {t}_pkey;", "VACUUM {t};", safe_no_transaction=True),
    Case("drop-index-not-concurrent", "DROP INDEX {t}_a_uix;",
         "DROP INDEX CONCURRENTLY IF EXISTS {t}_a_uix;", safe_no_transaction=True),
    Case("reindex-not-concurrent", "REINDEX TABLE {t};", "REINDEX TABLE CONCURRENTLY {t};",
         safe_no_transaction=True),
]  # fmt: skip
ROWS = 5_000


@pytest.fixture
def live(empty_db_url: str) -> str:
    """A database whose `existing` table (and `parent`) hold rows before the run."""
    with psycopg.connect(empty_db_url, autocommit=True) as c:
        c.execute("CREATE TABLE parent (id int PRIMARY KEY)")
        c.execute("CREATE TABLE existing (id int PRIMARY KEY, a int, b text NOT NULL)")
        c.execute("INSERT INTO parent SELECT g FROM generate_series(1, %s) g", (ROWS,))
        c.execute("INSERT INTO existing SELECT g, g, 'row' FROM generate_series(1, %s) g", (ROWS,))
        c.execute("CREATE UNIQUE INDEX existing_a_uix ON existing (a)")
        c.execute("ANALYZE existing")
        c.execute("ANALYZE parent")
    return empty_db_url


def lint(cli: CLI, url: str, folder: Path, *args: str) -> list[dict[str, Any]]:
    result = cli("--database-url", url, "migrate", "lint", "--dir", str(folder), "--json", *args)
    assert result.exit_code == ExitCode.OK, result.stderr
    findings: list[dict[str, Any]] = json.loads(result.stdout)["findings"]
    return findings


def write(folder: Path, name: str, body: str, no_transaction: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text((NO_TX if no_transaction else "") + body + "\n")


def no_timeout(monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    """The lock timeout rule is about a runner told to set none (otherwise towerctl sets one)."""
    if case.rule == "lock-timeout-missing":
        monkeypatch.setenv("TOWER_MIGRATION_LOCK_TIMEOUT", "0")


CREATE_FRESH = """CREATE TABLE fresh (id int PRIMARY KEY, a int, b text NOT NULL);
CREATE UNIQUE INDEX fresh_a_uix ON fresh (a);"""


@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_a_rule_fires_on_an_existing_table_only_and_not_for_its_safe_alternative(
    cli: CLI, live: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    no_timeout(monkeypatch, case)
    on_existing = tmp_path / "existing"
    write(on_existing, "0001_risky.sql", "\n\n" + case.risky.format(t="existing"),
          case.no_transaction)  # fmt: skip
    (found,) = [f for f in lint(cli, live, on_existing) if f["rule"] == case.rule]
    line = 4 if case.no_transaction else 3
    assert (found["file"], found["version"], found["line"]) == ("0001_risky.sql", 1, line)
    assert found["table"] == "existing" and found["rows"] == ROWS and found["bytes"] > 0
    assert found["accepted"] is False and found["fix"] and found["lock"] and found["blocks"]

    created_in_run = tmp_path / "fresh"
    write(created_in_run, "0001_create.sql", CREATE_FRESH)
    write(created_in_run, "0002_risky.sql", case.risky.format(t="fresh"), case.no_transaction)
    assert lint(cli, live, created_in_run) == []

    same_file = tmp_path / "same"
    if not case.no_transaction:
        write(same_file, "0001_both.sql", CREATE_FRESH + "\n" + case.risky.format(t="fresh"))
        assert lint(cli, live, same_file) == []

    safe = tmp_path / "safe"
    write(safe, "0001_safe.sql", case.safe.format(t="existing"), case.safe_no_transaction)
    assert [f["rule"] for f in lint(cli, live, safe)] == []


@pytest.mark.parametrize("case", CASES, ids=[c.rule for c in CASES])
def test_lint_ok_accepts_exactly_that_rule_at_that_statement(
    cli: CLI, live: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    no_timeout(monkeypatch, case)
    other = "cluster" if case.rule != "cluster" else "drop-table"
    body = "\n".join([
        f"-- towerctl:lint-ok {case.rule} the table is tiny in every deployment",
        case.risky.format(t="existing"),
        f"-- towerctl:lint-ok {other} another rule accepts nothing here",
        case.risky.format(t="existing"),
    ])  # fmt: skip
    write(tmp_path / "sql", "0001_accepted.sql", body, case.no_transaction)
    found = [f for f in lint(cli, live, tmp_path / "sql") if f["rule"] == case.rule]
    shift = 1 if case.no_transaction else 0
    assert [(f["line"], f["accepted"]) for f in found] == [(2 + shift, True), (4 + shift, False)]
    assert found[0]["reason"] == "the table is tiny in every deployment"


# --- outputs and exit codes -------------------------------------------------------------------

FIELDS = {"file", "version", "line", "rule", "table", "rows", "bytes", "lock", "blocks", "why",
          "fix", "accepted"}  # fmt: skip


def two_findings(folder: Path) -> Path:
    write(folder, "0001_new_table.sql", CREATE_FRESH + "\nCREATE INDEX fresh_b_ix ON fresh (b);")
    write(folder, "0002_index.sql", "\n".join([
        "CREATE INDEX existing_b_ix ON existing (b);",
        "-- towerctl:lint-ok set-not-null every row has a, checked by the release script",
        "ALTER TABLE existing ALTER COLUMN a SET NOT NULL;",
    ]))  # fmt: skip
    return folder


def test_json_is_a_list_of_findings_in_a_stable_shape(cli: CLI, live: str, tmp_path: Path) -> None:
    found = lint(cli, live, two_findings(tmp_path / "sql"))
    assert [set(f) >= FIELDS for f in found] == [True, True]
    assert [(f["file"], f["version"], f["line"], f["rule"], f["table"], f["accepted"])
            for f in found] == [
        ("0002_index.sql", 2, 1, "index-not-concurrent", "existing", False),
        ("0002_index.sql", 2, 3, "set-not-null", "existing", True),
    ]  # fmt: skip
    assert found[0]["rows"] == ROWS and isinstance(found[0]["bytes"], int)
    assert found[0]["lock"] == "SHARE" and "writes" in found[0]["blocks"]
    assert "CONCURRENTLY" in found[0]["fix"]


def test_findings_are_warnings_unless_strict(cli: CLI, live: str, tmp_path: Path) -> None:
    folder = two_findings(tmp_path / "sql")
    args = ("--database-url", live, "migrate")
    plain = cli(*args, "lint", "--dir", str(folder))
    assert plain.exit_code == ExitCode.OK, plain.stderr
    assert "0002_index.sql:1  index-not-concurrent" in plain.stdout
    assert "  table    existing (5 k rows, " in plain.stdout
    assert "0002_index.sql:3  set-not-null  [accepted]" in plain.stdout
    assert "lint: 2 findings (1 accepted)" in plain.stderr

    strict = cli(*args, "lint", "--dir", str(folder), "--strict")
    assert strict.exit_code == ExitCode.MIGRATION
    assert strict.stderr.strip().splitlines()[-1].startswith("towerctl: lint --strict: 1 finding")

    write(folder, "0002_index.sql", "-- towerctl:lint-ok index-not-concurrent built at night\n"
          + (folder / "0002_index.sql").read_text())  # fmt: skip
    accepted = cli(*args, "lint", "--dir", str(folder), "--strict")
    assert accepted.exit_code == ExitCode.OK, accepted.stderr


def test_dry_run_warns_with_the_findings_and_exits_as_the_run_would(
    cli: CLI, live: str, tmp_path: Path
) -> None:
    folder = two_findings(tmp_path / "sql")
    dry = cli("--database-url", live, "migrate", "--dir", str(folder), "--dry-run")
    assert dry.exit_code == ExitCode.OK, dry.stderr
    assert "would apply 0002_index.sql" in dry.stdout
    assert "0002_index.sql:1  index-not-concurrent" in dry.stderr
    assert "lint: 2 findings (1 accepted)" in dry.stderr


def test_status_counts_findings_and_check_exits_7(cli: CLI, live: str, tmp_path: Path) -> None:
    folder = two_findings(tmp_path / "sql")
    args = ("--database-url", live, "migrate", "status", "--dir", str(folder))
    shown = cli(*args)
    assert shown.exit_code == ExitCode.OK, shown.stderr
    (row,) = [ln for ln in shown.stdout.splitlines() if "0002_index.sql" in ln]
    assert "(lint: 2, 1 accepted)" in row
    assert "lint of the pending files: 2 findings (1 accepted)" in shown.stdout
    as_json = json.loads(cli(*args, "--json").stdout)["migrations"]
    assert [(m["version"], m.get("lintFindings"), m.get("lintAccepted")) for m in as_json] == [
        (1, None, None), (2, 2, 1)
    ]  # fmt: skip
    check = cli(*args, "--check")
    assert check.exit_code == ExitCode.MIGRATION
    assert "lint: 2 findings (1 accepted)" in check.stderr


def test_bad_input_is_one_line_and_its_code(cli: CLI, live: str, tmp_path: Path) -> None:
    missing = cli("--database-url", live, "migrate", "lint", "--dir", str(tmp_path / "nowhere"))
    assert missing.exit_code == ExitCode.BAD_INPUT
    assert len(missing.stderr.strip().splitlines()) == 1
    write(tmp_path / "sql", "0001_broken.sql", "CREATE INDEX ON;")
    broken = cli("--database-url", live, "migrate", "lint", "--dir", str(tmp_path / "sql"))
    assert broken.exit_code == ExitCode.MIGRATION
    assert "0001_broken.sql, line 1" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


def test_a_table_dropped_and_created_again_in_the_run_is_new(
    cli: CLI, live: str, tmp_path: Path
) -> None:
    write(tmp_path / "sql", "0001_recreate.sql", "DROP TABLE existing;\n" + CREATE_FRESH.replace(
        "fresh", "existing").replace("existing_a_uix", "existing_a_uix2"))  # fmt: skip
    write(tmp_path / "sql", "0002_index.sql", "CREATE INDEX existing_b_ix ON existing (b);")
    assert [(f["file"], f["rule"]) for f in lint(cli, live, tmp_path / "sql")] == [
        ("0001_recreate.sql", "drop-table")
    ]


def test_on_a_terminal_each_finding_is_a_block_shown_as_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    rule = migrations.RULES["set-not-null"]
    found = migrations.Finding("0003_x.sql", 3, 7, rule.name, "odd[name]", 20_000_000,
                               4 * 1024**3, rule.lock, rule.blocks, rule.why, rule.fix, True,
                               "checked [by hand]")  # fmt: skip
    out = io.StringIO()
    write_findings([found], out, terminal=True)
    screen = out.getvalue()
    assert "0003_x.sql:7  set-not-null  [accepted]" in screen.splitlines()[0]
    assert "odd[name] (20 M rows, 4 GB)" in screen and "checked [by hand]" in screen
