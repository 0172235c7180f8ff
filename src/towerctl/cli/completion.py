"""`towerctl completion SHELL`: the shell completion script."""

from __future__ import annotations

import sys
from typing import Literal

import typer
import typer.main

from towerctl.cli import COMPLETE_VAR, app
from towerctl.cli.typer_adapter import completion_script

Shell = Literal["bash", "zsh", "fish"]


def completion(
    shell: Shell = typer.Argument(..., help="bash, zsh or fish."),
) -> None:
    """Print the shell completion script for bash, zsh or fish.

    It completes commands, options, --format values and, when the store is at
    hand, session ids. Install it once:

    \b
      bash: towerctl completion bash > ~/.local/share/bash-completion/completions/towerctl
      zsh:  towerctl completion zsh > "${fpath[1]}/_towerctl"
      fish: towerctl completion fish > ~/.config/fish/completions/towerctl.fish
    """

    script = completion_script(typer.main.get_command(app), shell, "towerctl", COMPLETE_VAR)
    sys.stdout.write(script if script.endswith("\n") else script + "\n")
