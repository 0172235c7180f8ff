"""`towerctl db`: the embedded PostgreSQL server."""

from __future__ import annotations

import sys

import typer

from towerctl import config, embedded
from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import note, print_json, state
from towerctl.context import configured_database
from towerctl.errors import BadInput

app = typer.Typer(
    help="The embedded PostgreSQL server (the default database).", no_args_is_help=True
)


@app.command("url")
def url(ctx: typer.Context) -> None:
    """Print the embedded server's connection URL (starting it if needed), e.g. for psql.

    Refused (exit 2, nothing started) when another database is configured.
    """

    other = configured_database(state(ctx).database_url)
    if other is not None:
        raise BadInput(
            f"{other.source} names another database ({other.value}); "
            "db url speaks of the embedded server only",
            hint="'towerctl context' shows the database in use",
        )
    sys.stdout.write(embedded.ensure_running(config.home()).url + "\n")


@app.command("status")
def status(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Report whether the embedded server is running, and where its data and socket live
    (and when commands use another, configured database instead)."""

    other = configured_database(state(ctx).database_url)

    pgdata = embedded.pgdata_path(config.home())
    info = embedded.read_running(pgdata)
    report = {
        "running": info is not None,
        "pgdata": str(pgdata),
        "initialized": (pgdata / "PG_VERSION").exists(),
        "pid": info.pid if info else None,
        "url": info.url if info else None,
        "socketDir": str(info.socket_dir) if info else None,
        "dataFolder": str(pgdata.resolve()),
        "configuredDatabase": None if other is None else other.value,
        "configuredBy": None if other is None else other.source,
    }
    if as_json:
        print_json(report)
        return
    if info is None:
        sys.stdout.write(f"embedded server: stopped (data in {pgdata})\n")
    else:
        sys.stdout.write(f"embedded server: running, pid {info.pid}, data in {pgdata}\n")
        if report["dataFolder"] != str(pgdata):
            sys.stdout.write(f"data folder: {report['dataFolder']}\n")
        sys.stdout.write(f"url: {info.url}\n")
    if other is not None:
        sys.stdout.write(f"commands use another database: {other.value} ({other.source})\n")


@app.command("stop")
def stop() -> None:
    """Stop the embedded server (fast shutdown); the next command starts it again."""

    if embedded.stop(config.home()):
        note("embedded server stopped")
    else:
        note("embedded server was not running")
