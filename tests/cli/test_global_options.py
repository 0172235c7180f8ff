"""The root's options work after the sub-command too, as gh and kubectl allow."""

from __future__ import annotations

import json

import pytest

from conftest import CLI, open_session
from towerctl.cli import hoist_global_options
from towerctl.errors import ExitCode


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        (
            ["session", "show", "X", "--database-url", "U"],
            ["--database-url", "U", "session", "show", "X"],
        ),
        (
            ["session", "show", "X", "--database-url=U"],
            ["--database-url=U", "session", "show", "X"],
        ),
        (["doctor", "--traceback", "--json"], ["--traceback", "doctor", "--json"]),
        (["--database-url", "U", "doctor"], ["--database-url", "U", "doctor"]),
        (
            ["session", "request", "X", "--", "--traceback"],
            ["session", "request", "X", "--", "--traceback"],
        ),
    ],
)
def test_root_options_move_before_the_sub_command(given: list[str], parsed: list[str]) -> None:
    assert hoist_global_options(given) == parsed


def test_database_url_after_the_sub_command_is_used(
    cli: CLI, tower_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    session = open_session(cli)
    monkeypatch.delenv("TOWER_DATABASE_URL")
    done = cli(
        "session", "show", session.id, "--json", "--database-url", tower_env["TOWER_DATABASE_URL"]
    )
    assert done.exit_code == ExitCode.OK, done.stderr
    assert json.loads(done.stdout)["sessionId"] == session.id
    unreachable = cli("session", "show", session.id, "--database-url=postgresql://x@127.0.0.1:1/x")
    assert unreachable.exit_code == ExitCode.UNREACHABLE
