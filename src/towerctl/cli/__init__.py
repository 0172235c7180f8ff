"""The command line: `towerctl NOUN VERB`. Parsing and rendering only; the work is in services."""

from __future__ import annotations

import os
import sys

import click
import typer

from towerctl import __version__
from towerctl.cli import db as db_cli
from towerctl.cli import doctor as doctor_cli
from towerctl.cli import macaroon as macaroon_cli
from towerctl.cli import migrate as migrate_cli
from towerctl.cli import request as _request_cli  # noqa: F401 - registers `session request`
from towerctl.cli import session as session_cli
from towerctl.cli import transcript as _transcript_cli  # noqa: F401 - `session messages` etc.
from towerctl.cli.output import PipeGuard, StdoutClosed
from towerctl.cli.state import State
from towerctl.errors import ExitCode, TowerError

app = typer.Typer(
    name="towerctl",
    help="The operator's command line for the Timmy Tower session store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
app.add_typer(migrate_cli.app, name="migrate")
app.add_typer(db_cli.app, name="db")
app.add_typer(session_cli.app, name="session")
app.add_typer(macaroon_cli.app, name="macaroon")
app.command("doctor")(doctor_cli.doctor)


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
    traceback: bool = typer.Option(
        False, "--traceback", help="Show a Python traceback for internal errors."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    ctx.obj = State(database_url=database_url, traceback=traceback)


def _fail(message: str, code: int) -> int:
    """The one line on stderr for a failure: outside text in it is shown visibly, bounded."""
    from towerctl.sanitize import for_diagnostic

    sys.stderr.write(f"towerctl: {for_diagnostic(message)}\n")
    return code


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _connection_lost(error: BaseException) -> bool:
    """A psycopg error that means the server went away (not a bug in towerctl)."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(error, psycopg.OperationalError):
        return False
    state = getattr(error, "sqlstate", None)
    # No SQLSTATE: the client lost the socket. 08: connection exception. 57P: shutdown.
    return state is None or state.startswith(("08", "57P"))


def _schema_missing(error: BaseException) -> bool:
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(
        error, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn
    )


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; the one place errors become codes."""
    show_traceback = "--traceback" in (argv if argv is not None else sys.argv[1:])
    real_stdout = sys.stdout
    sys.stdout = PipeGuard(real_stdout)
    try:
        result = app(args=argv, prog_name="towerctl", standalone_mode=False)
        sys.stdout.flush()  # a reader gone or a full device shows here: exit 0 or 10
    except TowerError as error:
        return _fail(str(error), int(error.exit_code))
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.exceptions.Abort:
        return _fail("aborted", 130)
    except click.ClickException as error:  # usage errors from the parser
        ctx = getattr(error, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _fail(f"{error.format_message()}{hint}", ExitCode.BAD_INPUT)
    except (StdoutClosed, BrokenPipeError):
        _quiet_stdout()
        return ExitCode.OK
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as error:
        if _schema_missing(error):
            return _fail(
                "the database has no towerctl schema (run 'towerctl migrate')",
                ExitCode.MIGRATION,
            )
        if _connection_lost(error):
            from towerctl.db import first_line

            return _fail(f"lost the database connection: {first_line(error)}", ExitCode.UNREACHABLE)
        if show_traceback:
            import traceback

            traceback.print_exc()
        return _fail(
            f"internal error: {type(error).__name__} (a bug; rerun with --traceback for details)",
            ExitCode.INTERNAL,
        )
    finally:
        sys.stdout = real_stdout
    return int(result) if isinstance(result, int) else ExitCode.OK


def main() -> None:
    code = run()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
    sys.exit(code)
