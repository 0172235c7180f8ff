"""The one place towerctl reaches past Typer's public API.

Typer (0.26 and later) carries its own copy of Click as the private package
`typer._click`; towerctl imports no standalone Click. Everything else in `cli/` uses
Typer's public names (`typer.Option(parser=, min=, max=, autocompletion=)`,
`typer.BadParameter`, `typer.Exit`, `typer.Abort`, `typer.Context`,
`typer.core.TyperGroup`). Typer has no public name for what follows, so towerctl
relies on these behaviours of its bundled Click, and on nothing else of it:

- The parser's errors: every refusal the parser makes is a `ClickException` with
  `exit_code` and `format_message()`; wrong flags and values are `UsageError`s (exit
  code 2) carrying the context of the command they concern; a group given no command
  under `no_args_is_help` is a `NoArgsIsHelpError`. `cli.run` turns them into one
  stderr line and the contract's exit code (towerctl prints the help and exits 0 for
  a bare group). Since 0.29 Typer coerces values through pydantic, whose messages
  for a `parser=` or choice refusal begin "Value error, ": `usage_message` drops it.
- The types of the parser's objects (`Context`, `Command`, `HelpFormatter`), which the
  lazily loaded root group (`cli.LazyGroup`, a `typer.core.TyperGroup`) and the help
  examples receive.
- Typer's shell-completion classes and protocol, without the `--install-completion`
  options that `add_completion` would add: `completion_init()` (`typer._completion_classes`)
  registers Typer's bash, zsh and fish classes with the bundled Click, whose
  `get_completion_class(shell)` gives the class that writes the script
  (`towerctl completion SHELL`); the script asks `_TOWERCTL_COMPLETE=complete_bash`
  (instruction, then shell) and `typer.completion.shell_complete` answers, one
  value a line for bash.

tests/cli/test_typer_adapter.py fails when a Typer release changes any of these.
"""

from __future__ import annotations

from typing import TypeAlias

from typer import _click
from typer._click import exceptions as _exceptions
from typer._click.shell_completion import get_completion_class
from typer._completion_classes import completion_init
from typer.completion import shell_complete

Context: TypeAlias = _click.Context
Command: TypeAlias = _click.Command
HelpFormatter: TypeAlias = _click.HelpFormatter

ClickException = _exceptions.ClickException
UsageError = _exceptions.UsageError
NoArgsIsHelpError = _exceptions.NoArgsIsHelpError

PYDANTIC_PREFIX = "Value error, "


def usage_message(error: ClickException) -> str:
    """What the parser refused, in its own words, without pydantic's prefix."""
    return error.format_message().replace(PYDANTIC_PREFIX, "")


def completion_script(command: Command, shell: str, prog_name: str, complete_var: str) -> str:
    """The script that makes `shell` ask `prog_name` for completions through `complete_var`."""
    completion_init()
    kind = get_completion_class(shell)
    if kind is None:
        raise ValueError(f"no completion for {shell}")
    return kind(command, {}, prog_name, complete_var).source()


def complete(command: Command, prog_name: str, complete_var: str, instruction: str) -> int:
    """Answer the completion script's question (`complete_bash` and the like) on stdout."""
    completion_init()
    return shell_complete(command, {}, prog_name, complete_var, instruction)
