"""The migration plan is a pure function of (files, ledger): no database here."""

from __future__ import annotations

from pathlib import Path

import pytest

from towerctl.errors import BadInput, MigrationError
from towerctl.migrations import (
    AppliedMigration,
    Migration,
    checksum,
    discover,
    plan_migrations,
    status,
)


def mig(version: int, name: str = "step", body: str = "SELECT 1;") -> Migration:
    data = body.encode()
    return Migration(version, name, Path(f"{version:04d}_{name}.sql"), checksum(data), body)


def row(m: Migration, check: str | None = None) -> AppliedMigration:
    return AppliedMigration(m.version, m.name, check or m.checksum, None, 1.0)


def test_fresh_database_plans_every_file_in_order() -> None:
    files = [mig(1), mig(2), mig(10)]
    assert [m.version for m in plan_migrations(files, []).steps] == [1, 2, 10]


def test_up_to_date_plans_nothing() -> None:
    files = [mig(1), mig(2)]
    assert plan_migrations(files, [row(f) for f in files]).steps == ()


def test_target_stops_at_version() -> None:
    files = [mig(1), mig(2), mig(3)]
    assert [m.version for m in plan_migrations(files, [], target=2).steps] == [1, 2]


def test_unknown_target_is_refused() -> None:
    with pytest.raises(BadInput, match="--to 7"):
        plan_migrations([mig(1)], [], target=7)


def test_drift_is_refused_naming_the_file() -> None:
    one = mig(1, "sessions")
    with pytest.raises(MigrationError, match=r"0001_sessions\.sql changed"):
        plan_migrations([one, mig(2)], [row(one, "0" * 64)])


def test_missing_file_is_refused() -> None:
    gone = mig(3, "gone")
    with pytest.raises(MigrationError, match="3_gone has no file"):
        plan_migrations([mig(1)], [row(mig(1)), row(gone)])


def test_duplicate_versions_name_both_files() -> None:
    a, b = mig(8, "session_messages"), mig(8, "session_tags")
    with pytest.raises(MigrationError) as info:
        plan_migrations([mig(7), a, b], [])
    assert "0008_session_messages.sql" in str(info.value)
    assert "0008_session_tags.sql" in str(info.value)


def test_out_of_order_is_refused_unless_allowed() -> None:
    files = [mig(1), mig(2), mig(3)]
    applied = [row(files[0]), row(files[2])]
    with pytest.raises(MigrationError, match="out of order"):
        plan_migrations(files, applied)
    plan = plan_migrations(files, applied, allow_out_of_order=True)
    assert [m.version for m in plan.steps] == [2]


def test_every_problem_is_reported_at_once() -> None:
    one = mig(1)
    with pytest.raises(MigrationError, match="2 problems"):
        plan_migrations([one, mig(2, "a"), mig(2, "b")], [row(one, "f" * 64)])


def test_status_states() -> None:
    files = [mig(1), mig(2), mig(3)]
    ledger = [row(files[0]), row(files[1], "e" * 64), row(mig(9, "old"))]
    got = {s.version: s.state for s in status(files, ledger)}
    assert got == {1: "applied", 2: "changed", 3: "pending", 9: "missing"}


def test_checksum_ignores_crlf() -> None:
    assert checksum(b"SELECT 1;\r\nSELECT 2;\r\n") == checksum(b"SELECT 1;\nSELECT 2;\n")
    assert checksum(b"SELECT 1;") != checksum(b"SELECT 2;")


def test_discover_reads_names_modes_and_ignores_other_files(tmp_path: Path) -> None:
    (tmp_path / "0002_b.sql").write_text("-- towerctl:no-transaction\nSELECT 1;\n")
    (tmp_path / "0001_a.sql").write_text("SELECT 1;\r\n")
    (tmp_path / "README.md").write_text("notes")
    found = discover(tmp_path)
    assert [(m.version, m.name, m.transactional) for m in found] == [
        (1, "a", True),
        (2, "b", False),
    ]


@pytest.mark.parametrize("bad", ["1.sql", "abc_x.sql", "0001-x.sql", "0001_.sql"])
def test_discover_refuses_badly_named_sql(tmp_path: Path, bad: str) -> None:
    (tmp_path / bad).write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"NNNN_name\.sql"):
        discover(tmp_path)


def test_discover_refuses_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_bytes(b"SELECT '\xff';")
    with pytest.raises(MigrationError, match="not UTF-8"):
        discover(tmp_path)


def test_discover_refuses_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="not found"):
        discover(tmp_path / "nope")
