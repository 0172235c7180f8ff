"""`towerctl db`: the embedded PostgreSQL server, and laying a store out over Citus."""

from __future__ import annotations

import sys

import typer

from towerctl import config, distribute, embedded
from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import connect, note, print_json, state
from towerctl.context import configured_database
from towerctl.errors import BadInput

app = typer.Typer(
    help="The embedded PostgreSQL server (the default database); laying a store out over "
    "a Citus cluster.",
    no_args_is_help=True,
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


@app.command("distribute")
def distribute_store(
    ctx: typer.Context,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and what is in place already; change nothing."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Lay a migrated store out over a Citus cluster, by session (run on the coordinator).

    Distributes sessions by id and every per-session table by session_id, colocated;
    makes the other session-less tables reference tables and keeps the migration ledger
    on the coordinator, with the session functions (so ids keep their order through a
    shard move); drops the trigger behind `session messages --follow` (the request's
    write notifies instead).
    Idempotent: what is in place is skipped (and `migrate` places what a later migration
    adds). Exit 2 where Citus is not installed (--dry-run still prints the plan).
    """

    conn = connect(ctx)
    plan = distribute.plan(conn)
    ran = [] if dry_run else distribute.apply(conn, plan)
    if dry_run and plan.citus is None:
        note("Citus is not installed in this database: the plan below is what a Citus "
             "coordinator would get")  # fmt: skip
    done_now = {id(step) for step in ran}
    if as_json:
        print_json(
            {
                "citus": plan.citus,
                "dryRun": dry_run,
                "steps": [
                    {
                        "action": step.action,
                        "object": step.target,
                        "detail": step.detail,
                        "state": _state(step, dry_run, id(step) in done_now),
                    }
                    for step in plan.steps
                ],
            }
        )
        return
    for step in plan.steps:
        state_text = _state(step, dry_run, id(step) in done_now)
        target = step.target.split("(")[0]  # a function by its name (--json: its signature)
        sys.stdout.write(f"{state_text:<8}  {step.action:<19}  {target}: {step.detail}\n")


def _state(step: distribute.Step, dry_run: bool, ran: bool) -> str:
    """ "in place" (found so), "done" (by this run), "planned" (a dry run's next step)."""
    if step.done:
        return "in place"
    return "done" if ran else "planned"
