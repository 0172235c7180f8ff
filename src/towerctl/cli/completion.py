"""`towerctl completion SHELL`: the shell completion script."""

from __future__ import annotations

import sys

import click
import typer

SHELLS = ("bash", "zsh", "fish")


def completion(
    shell: str = typer.Argument(..., click_type=click.Choice(SHELLS), help="bash, zsh or fish."),
) -> None:
    """Print the shell completion script for bash, zsh or fish.

    It completes commands, options, --format values and, when the store is at
    hand, session ids. Install it once:

      bash: towerctl completion bash > ~/.local/share/bash-completion/completions/towerctl
      zsh:  towerctl completion zsh > "${fpath[1]}/_towerctl"
      fish: towerctl completion fish > ~/.config/fish/completions/towerctl.fish
    """
    import typer.main
    from click.shell_completion import get_completion_class

    from towerctl.cli import COMPLETE_VAR, app

    kind = get_completion_class(shell)
    assert kind is not None
    script = kind(typer.main.get_command(app), {}, "towerctl", COMPLETE_VAR).source()
    sys.stdout.write(script if script.endswith("\n") else script + "\n")
