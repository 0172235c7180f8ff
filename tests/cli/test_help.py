"""Help as gh and kubectl users expect it: bare groups print help (exit 0), `-h`
everywhere, one suggestion per typo, whole summaries, and lazy loading that
still lists every command."""

from __future__ import annotations

import pytest

from conftest import CLI
from towerctl.cli import SUBCOMMANDS, LazyGroup, app
from towerctl.cli.typer_adapter import Command
from towerctl.errors import ExitCode


def every_command() -> list[tuple[str, ...]]:
    """The command paths of the whole tree (importing every lazy sub-command)."""
    import typer.main

    root = typer.main.get_command(app)
    assert isinstance(root, LazyGroup)
    ctx = typer.Context(root)
    found: list[tuple[str, ...]] = []

    def walk(command: Command, path: tuple[str, ...]) -> None:
        found.append(path)
        if isinstance(command, typer.core.TyperGroup):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, (*path, name))

    walk(root, ())
    return found


def test_the_tree_holds_every_documented_command() -> None:
    paths = {" ".join(p) for p in every_command()}
    for expected in (
        "migrate",
        "migrate status",
        "db url",
        "session open",
        "session request",
        "session messages",
        "session clear-history",
        "macaroon mint",
        "macaroon inspect",
        "doctor",
    ):
        assert expected in paths
    assert set(SUBCOMMANDS) == {p[0] for p in every_command() if p}


@pytest.mark.parametrize("group", [(), ("session",), ("macaroon",), ("db",)])
def test_a_bare_group_prints_its_help_on_stdout_and_exits_0(cli: CLI, group: tuple[str]) -> None:
    done = cli(*group)
    assert done.exit_code == ExitCode.OK
    assert done.stdout.startswith("Usage: towerctl") and "Commands:" in done.stdout
    assert done.stderr == ""


def test_dash_h_works_on_every_command(cli: CLI) -> None:
    for path in every_command():
        done = cli(*path, "-h")
        assert done.exit_code == ExitCode.OK, (path, done.stderr)
        assert done.stdout.startswith("Usage: towerctl"), path


def test_command_lists_show_whole_summaries(cli: CLI) -> None:
    for group in [(), ("session",), ("macaroon",), ("db",), ("migrate",)]:
        done = cli(*group, "--help")
        listing = done.stdout.split("Commands:", 1)[-1]
        assert "..." not in listing, (group, listing)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [(("sesion",), "session"), (("session", "shw"), "show"), (("macaroon", "mnt"), "mint")],
)
def test_a_typo_gets_exactly_one_suggestion(cli: CLI, typo: tuple[str], suggestion: str) -> None:
    done = cli(*typo)
    assert done.exit_code == ExitCode.BAD_INPUT
    assert done.stderr.count("Did you mean") == 1
    assert f"Did you mean '{suggestion}'?" in done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "path",
    [("migrate",), ("session", "request"), ("session", "messages"), ("macaroon", "mint")],
)
def test_daily_commands_show_examples(cli: CLI, path: tuple[str, ...]) -> None:
    done = cli(*path, "--help")
    assert done.exit_code == ExitCode.OK
    examples = done.stdout.split("Examples:", 1)[1].strip().splitlines()
    assert len(examples) >= 2
    token_set = False  # an example that needs a macaroon names one, or follows a line that does
    for line in (line.strip() for line in examples if line.strip()):
        if line.startswith("export "):
            token_set = token_set or line.startswith("export TOWER_MACAROON_FILE=")
            continue
        assert "towerctl " + " ".join(path) in line
        if path[0] == "session":
            assert token_set or "--macaroon-file" in line, line


def test_help_is_a_command_too(cli: CLI) -> None:
    done = cli("help", "session", "messages")
    assert done.exit_code == ExitCode.OK
    assert done.stdout == cli("session", "messages", "--help").stdout
    assert cli("help").stdout == cli("--help").stdout
    assert cli("help", "nosuch").exit_code == ExitCode.BAD_INPUT


def test_completion_help_keeps_each_install_line_whole(cli: CLI) -> None:
    text = cli("completion", "--help").stdout
    for shell, line in (("bash", "bash: towerctl completion bash >"),
                        ("zsh", "zsh:  towerctl completion zsh >"),
                        ("fish", "fish: towerctl completion fish >")):  # fmt: skip
        shown = [row.strip() for row in text.splitlines() if row.strip().startswith(line)]
        assert len(shown) == 1, (shell, text)
        assert shown[0].endswith(("towerctl", '_towerctl"', "towerctl.fish")), shown


def test_request_help_says_json_prints_every_recorded_outcome(cli: CLI) -> None:
    text = " ".join(cli("session", "request", "--help").stdout.split())
    assert "every recorded outcome (complete, rejected, failed)" in text
