"""What towerctl relies on in Typer beyond its public API (`cli/typer_adapter.py`).

Each test pins one behaviour the adapter's docstring names, so a Typer release that
changes it fails here, with the adapter's name in the failure, instead of at a user.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout
from unittest import mock

import pytest
import typer
import typer.core
import typer.main

from towerctl.cli import COMPLETE_VAR, LazyGroup, app
from towerctl.cli import typer_adapter as adapter


def test_the_parser_objects_are_the_adapter_types() -> None:
    root = typer.main.get_command(app)
    assert isinstance(root, LazyGroup)
    assert isinstance(root, adapter.Command)
    assert issubclass(typer.Context, adapter.Context)
    assert issubclass(typer.core.TyperGroup, adapter.Command)


def test_usage_errors_are_click_exceptions_with_exit_code_2() -> None:
    assert issubclass(adapter.UsageError, adapter.ClickException)
    assert issubclass(adapter.NoArgsIsHelpError, adapter.UsageError)
    # A parser= callable refuses with typer.BadParameter: it must take the usage road.
    assert issubclass(typer.BadParameter, adapter.UsageError)
    assert adapter.UsageError("x").exit_code == 2
    assert adapter.UsageError("bad flag").format_message() == "bad flag"


def _parse(*args: str) -> BaseException:
    with pytest.raises(adapter.ClickException) as caught:
        app(args=list(args), prog_name="towerctl", standalone_mode=False)
    return caught.value


def test_a_bare_group_is_no_args_is_help_with_its_context() -> None:
    error = _parse("session")
    assert isinstance(error, adapter.NoArgsIsHelpError)
    assert error.ctx is not None and error.ctx.command_path == "towerctl session"


def test_a_bad_value_is_a_usage_error_naming_the_parameter() -> None:
    error = _parse("session", "open", "--deposit", "0")
    assert isinstance(error, adapter.UsageError)
    assert "--deposit" in error.format_message()
    error = _parse("session", "show", "not-a-uuid")
    assert isinstance(error, adapter.UsageError)
    message = adapter.usage_message(error)
    assert "not a session id" in message and adapter.PYDANTIC_PREFIX not in message
    assert "not-a-uuid" not in message  # the value itself is never quoted


def test_a_bad_choice_reads_without_pydantics_prefix() -> None:
    error = _parse("session", "list", "--state", "bogus")
    assert isinstance(error, adapter.ClickException)
    message = adapter.usage_message(error)
    assert "--state" in message and adapter.PYDANTIC_PREFIX not in message


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_each_shells_script_asks_with_typers_instruction(shell: str) -> None:
    script = adapter.completion_script(typer.main.get_command(app), shell, "towerctl", COMPLETE_VAR)
    assert f"{COMPLETE_VAR}=complete_{shell}" in script
    assert "towerctl" in script


def test_an_unknown_shell_has_no_script() -> None:
    with pytest.raises(ValueError, match="tcsh"):
        adapter.completion_script(typer.main.get_command(app), "tcsh", "towerctl", COMPLETE_VAR)


def test_bash_completion_answers_one_value_a_line() -> None:
    out = io.StringIO()
    words = {"COMP_WORDS": "towerctl session messages x --format n", "COMP_CWORD": "5"}
    with mock.patch.dict(os.environ, words), redirect_stdout(out):
        code = adapter.complete(
            typer.main.get_command(app), "towerctl", COMPLETE_VAR, "complete_bash"
        )
    assert code == 0
    assert out.getvalue().split() == ["ndjson"]
