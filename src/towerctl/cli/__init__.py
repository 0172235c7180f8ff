"""The command line: `towerctl NOUN VERB`. Parsing and rendering only; the work is in services."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import traceback
from difflib import get_close_matches
from typing import Any

import typer
import typer.core
import typer.main

from towerctl import __version__
from towerctl.cli import typer_adapter
from towerctl.cli.examples import add_examples
from towerctl.cli.output import PipeGuard, StdoutClosed
from towerctl.cli.state import ARGV, CURRENT, State, hide_tokens
from towerctl.cli.typer_adapter import Command, Context, HelpFormatter
from towerctl.db import classify
from towerctl.errors import ExitCode, TowerError, WriteFailed, unopenable_path
from towerctl.render import json_text
from towerctl.sanitize import for_diagnostic

# name -> (module:attribute, one-line summary). The module is imported when the
# command runs (through `typer.core.TyperGroup.get_command`), so `--version` and a command's
# own work never pay for the others; the summary serves the top-level help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "migrate": ("towerctl.cli.migrate:app", "Apply and inspect the numbered SQL migrations."),
    "db": (
        "towerctl.cli.db:app",
        "The embedded PostgreSQL server: url, status, stop; distribute over Citus.",
    ),
    "session": ("towerctl.cli.session:app", "Sessions: balances, requests and transcripts."),
    "macaroon": ("towerctl.cli.macaroon:app", "Macaroons that authorise work on one session."),
    "doctor": ("towerctl.cli.doctor:doctor", "Check the store's invariants (ledger, messages)."),
    "report": (
        "towerctl.cli.report:report",
        "Deposits, top-ups, debits and requests per hour or day (operator).",
    ),
    "context": (
        "towerctl.cli.context:context",
        "Which database, home, migrations and root key are in use.",
    ),
    "key": ("towerctl.cli.key:app", "The root key that mints macaroons: show, rotate."),
    "help": ("towerctl.cli.help:help_command", "Show the help of a command."),
    "completion": (
        "towerctl.cli.completion:completion",
        "Print the shell completion script for bash, zsh or fish.",
    ),
}
COMPLETE_VAR = "_TOWERCTL_COMPLETE"


def _load(target: str, name: str) -> Command:
    """The parser's command for `module:attribute` (a Typer app, or a function for one command)."""
    module_name, attribute = target.split(":")
    value: Any = getattr(importlib.import_module(module_name), attribute)
    for extra in LOADED_WITH.get(name, ()):
        importlib.import_module(extra)
    # Converted under a parent with the root's settings, as `add_typer` would do.
    holder = typer.Typer(add_completion=False, rich_markup_mode=None)
    if isinstance(value, typer.Typer):
        holder.add_typer(value, name=name)
    else:
        holder.command(name)(value)
        holder.callback()(lambda: None)  # keep a group, so the command keeps its name
    group = typer.main.get_command(holder)
    assert isinstance(group, typer.core.TyperGroup)
    command = group.commands[name]
    _full_summaries(command)

    add_examples(command, (name,))
    return command


def _full_summaries(command: Command) -> None:
    """Help lists show each command's whole first sentence, never one cut with "..."."""
    for sub in getattr(command, "commands", {}).values():
        if sub.short_help is None and sub.help:
            sub.short_help = " ".join(sub.help.strip().split("\n\n")[0].split())
        _full_summaries(sub)


# Modules that add commands to a group when imported (`session request`, `session messages`).
LOADED_WITH: dict[str, tuple[str, ...]] = {
    "session": ("towerctl.cli.request", "towerctl.cli.transcript"),
}


class LazyGroup(typer.core.TyperGroup):
    """The root group: sub-commands are imported on first use."""

    def list_commands(self, ctx: Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name not in self.commands and cmd_name in SUBCOMMANDS:
            self.add_command(_load(SUBCOMMANDS[cmd_name][0], cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: Context, args: list[str]
    ) -> tuple[str | None, Command | None, list[str]]:
        # Typer suggests only among the commands already loaded: suggest among them all.
        name = args[0] if args else ""
        known = self.list_commands(ctx)
        if name and name[0] != "-" and not ctx.resilient_parsing and name not in known:
            hint = ""
            if match := get_close_matches(name, known, n=1):
                hint = f" Did you mean {match[0]!r}?"
            ctx.fail(f"No such command {name!r}.{hint}")
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in sorted(SUBCOMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


app = typer.Typer(
    name="towerctl",
    cls=LazyGroup,
    help="The operator's command line for the Timmy Tower session store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"towerctl {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="PostgreSQL URL or libpq connection string [env: TOWER_DATABASE_URL]. "
        "Default: the embedded server.",
        show_default=False,
    ),
    read_database_url: str | None = typer.Option(
        None,
        "--read-database-url",
        help="A read-only replica for session show/list/messages and doctor's reads "
        "[env: TOWER_READ_DATABASE_URL]. Default: the primary.",
        show_default=False,
    ),
    traceback: bool = typer.Option(
        False, "--traceback", help="Show a Python traceback for internal errors."
    ),
    no_pager: bool = typer.Option(
        False,
        "--no-pager",
        help="Never page long output on a terminal [pager: TOWER_PAGER, PAGER, less -FRX].",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = State(
        database_url=database_url,
        read_database_url=read_database_url,
        traceback=traceback,
        no_pager=no_pager,
    )
    CURRENT[:] = [ctx.obj]


def _fail(message: str, code: int, *, json_wanted: bool = False) -> int:
    """The one line on stderr for a failure: outside text in it is shown visibly, bounded.

    With --json, when the command has printed nothing yet, the failure is also a
    JSON document on stdout, so a script reading stdout always gets one.
    """

    line = for_diagnostic(message)
    sys.stderr.write(f"towerctl: {line}\n")
    wanted = json_wanted or (bool(CURRENT) and CURRENT[0].json_output)
    stdout = sys.stdout
    if wanted and not getattr(stdout, "written", True):
        doc = {"error": {"message": line, "exitCode": int(code)}}
        with contextlib.suppress(OSError, StdoutClosed, WriteFailed):
            stdout.write(json_text(doc) + "\n")
            stdout.flush()
    return code


def _flushed(code: int) -> int:
    """`code` once what was printed has left: a full device makes a success exit 10; a
    reader gone changes nothing."""
    try:
        sys.stdout.flush()
    except (StdoutClosed, BrokenPipeError):
        _quiet_stdout()
    except WriteFailed as failed:
        return _fail(str(failed), int(failed.exit_code)) if code == ExitCode.OK else code
    return code


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _one_suggestion(message: str) -> str:
    """Typer's groups and Click may each add the same "Did you mean" sentence: keep one."""
    head, sep, tail = message.partition(" Did you mean ")
    return head + sep + tail.split(" Did you mean ")[0] if sep else message


def _complete(instruction: str) -> int:
    """Answer the completion script's question with Typer's completion machinery."""
    try:
        return typer_adapter.complete(
            typer.main.get_command(app), "towerctl", COMPLETE_VAR, instruction
        )
    except Exception:  # never a traceback into a shell prompt
        return 1


def _classify(error: BaseException) -> TowerError | None:
    """A failure the contract names, or None (`db.classify` decides for the database)."""

    return classify(error) or unopenable_path(error)


# The root's options, and whether each takes a value: accepted after the sub-command too.
GLOBAL_OPTIONS = {
    "--database-url": True,
    "--read-database-url": True,
    "--traceback": False,
    "--no-pager": False,
}


def hoist_global_options(args: list[str]) -> list[str]:
    """`args` with the root's options moved before the sub-command, so that
    `towerctl session show ID --database-url URL` works as gh and kubectl allow.
    Nothing after `--` moves: it is data."""
    hoisted: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            rest.extend(args[i:])
            break
        name = word.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            takes_value = GLOBAL_OPTIONS[name] and "=" not in word
            hoisted.extend(args[i : i + 1 + takes_value])
            i += 1 + takes_value
            continue
        rest.append(word)
        i += 1
    return hoisted + rest


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; the one place errors become codes."""
    args = hoist_global_options(argv if argv is not None else sys.argv[1:])
    show_traceback = "--traceback" in args
    if COMPLETE_VAR in os.environ:  # the shell asks for completions (<TAB>)
        return _complete(os.environ[COMPLETE_VAR])
    real_stdout = sys.stdout
    sys.stdout = PipeGuard(real_stdout)
    CURRENT.clear()
    ARGV[:] = args
    try:
        result = app(args=args, prog_name="towerctl", standalone_mode=False)
        sys.stdout.flush()  # a reader gone or a full device shows here: exit 0 or 10
    except TowerError as error:
        return _fail(hide_tokens(str(error), args), int(error.exit_code))
    except typer.Exit as done:  # --help, or a command that chose its code
        return _flushed(int(done.exit_code))
    except typer_adapter.NoArgsIsHelpError as bare:
        # `towerctl` or `towerctl session` alone: the help on stdout, exit 0 (as gh does).
        assert bare.ctx is not None
        sys.stdout.write(bare.ctx.get_help() + "\n")
        return _flushed(ExitCode.OK)
    except typer.Abort:
        return _fail("aborted", 130)
    except typer_adapter.ClickException as error:  # usage errors from the parser
        ctx = getattr(error, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = hide_tokens(_one_suggestion(typer_adapter.usage_message(error)), args, usage=True)
        # The parser may refuse a value before it reaches --json: look at the words.
        options = args[: args.index("--")] if "--" in args else args
        return _fail(f"{message}{hint}", ExitCode.BAD_INPUT, json_wanted="--json" in options)
    except (StdoutClosed, BrokenPipeError):
        _quiet_stdout()
        return ExitCode.OK
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as error:
        known = _classify(error)
        if known is not None:
            return _fail(str(known), int(known.exit_code))
        if show_traceback:
            traceback.print_exc()
        return _fail(
            f"internal error: {type(error).__name__} (a bug; rerun with --traceback for details)",
            ExitCode.INTERNAL,
        )
    finally:
        sys.stdout = real_stdout
        CURRENT.clear()
    return int(result) if isinstance(result, int) else ExitCode.OK


def main() -> None:
    code = run()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    sys.exit(code)
