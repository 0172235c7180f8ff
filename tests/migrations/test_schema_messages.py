"""What towerctl says when the database's schema is not the one it expects."""

from __future__ import annotations

import psycopg
import pytest

from conftest import CLI, direct, open_session
from towerctl.errors import ExitCode

NO_SCHEMA = "no towerctl schema (run 'towerctl migrate')"


@pytest.mark.parametrize(
    "args",
    [
        ["session", "list"],
        ["session", "open", "--deposit", "100"],
        ["session", "show", "3e137fe9"],
        ["report"],
        ["migrate", "status"],
    ],
    ids=" ".join,
)
def test_a_database_without_the_schema_says_so(
    cli: CLI, empty_db_url: str, args: list[str]
) -> None:
    result = cli("--database-url", empty_db_url, *args)
    if args == ["migrate", "status"]:  # an empty database is a fresh one: all pending
        assert result.exit_code == ExitCode.OK, result.stderr
        return
    assert result.exit_code == ExitCode.MIGRATION, result.stderr
    assert NO_SCHEMA in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "args"),
    [
        ("ALTER TABLE tower_schema_migrations DROP COLUMN baseline", ["migrate", "status"]),
        ("ALTER TABLE tower_schema_migrations DROP COLUMN baseline", ["migrate"]),
        ("ALTER TABLE balance_ledger DROP COLUMN created_at", ["report"]),
        ("DROP FUNCTION towerctl_take_request CASCADE", ["session", "request"]),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_a_schema_changed_by_hand_is_not_called_missing(
    cli: CLI, db_url: str, change: str, args: list[str]
) -> None:
    """A dropped column or function is named, and not reported as "no towerctl schema"
    with the advice to migrate (which would not help: everything is applied)."""
    session = open_session(cli)
    with psycopg.connect(direct(db_url), autocommit=True) as conn:
        conn.execute(change)
    if args == ["session", "request"]:
        args = [*args, session.id, "hi", "--macaroon", session.macaroon, "--agent", "echo"]
    result = cli(*args)
    assert result.exit_code == ExitCode.MIGRATION, result.stderr
    assert NO_SCHEMA not in result.stderr
    assert "lacks what this towerctl uses" in result.stderr
    assert "does not exist" in result.stderr
    assert len(result.stderr.splitlines()) == 1
