"""With --json, every outcome is a JSON document on stdout — refusals included, with
the error and the exit code inside — so a script reading stdout always gets one."""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import CLI
from towerctl.cli.params import _remember_json
from towerctl.errors import ExitCode

from .test_help import every_command

UNKNOWN = str(uuid.UUID(int=7))


def test_every_json_flag_is_the_shared_option() -> None:
    """One `--json` everywhere: the shared option that makes refusals JSON too."""
    import typer.main

    from towerctl.cli import app

    root = typer.main.get_command(app)
    ctx = typer.Context(root)
    seen = 0
    for path in every_command():
        command = root
        for name in path:
            assert isinstance(command, typer.core.TyperGroup)
            found = command.get_command(ctx, name)
            assert found is not None
            command = found
        for param in command.params:
            if "--json" in getattr(param, "opts", ()):
                seen += 1
                assert param.callback is not None, path
                assert getattr(param.callback, "__wrapped__", param.callback) is _remember_json or (
                    "_remember_json" in repr(param.callback)
                ), path
    assert seen >= 8


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("session", "open", "--deposit", "0", "--json"), ExitCode.BAD_INPUT),
        (("session", "show", "not-a-uuid", "--json"), ExitCode.BAD_INPUT),
        (("session", "show", UNKNOWN, "--json"), ExitCode.NOT_FOUND),
        (("session", "topup", UNKNOWN, "--sats", "5", "--json"), ExitCode.NOT_FOUND),
        (("session", "list", "--state", "bogus", "--json"), ExitCode.BAD_INPUT),
        (("macaroon", "inspect", "garbage", "--json"), ExitCode.UNAUTHORIZED),
        (("migrate", "status", "--dir", "/nonexistent/folder", "--json"), ExitCode.BAD_INPUT),
    ],
)
def test_a_refusal_with_json_is_a_json_document(cli: CLI, args: tuple[str], code: int) -> None:
    done = cli(*args)
    assert done.exit_code == code, done.stderr
    doc = json.loads(done.stdout)
    assert doc["error"]["exitCode"] == code
    assert doc["error"]["message"] and doc["error"]["message"] in done.stderr
    assert done.stderr.count("\n") == 1


def test_an_unreachable_database_with_json_is_a_json_document(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    done = cli("session", "list", "--json")
    assert done.exit_code == ExitCode.UNREACHABLE
    assert json.loads(done.stdout)["error"]["exitCode"] == ExitCode.UNREACHABLE


def test_without_json_a_refusal_prints_nothing_on_stdout(cli: CLI) -> None:
    done = cli("session", "show", UNKNOWN)
    assert done.exit_code == ExitCode.NOT_FOUND
    assert done.stdout == ""
