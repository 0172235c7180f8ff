"""`towerctl session purge`: delete the histories of sessions expired long enough."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta

import typer

from towerctl.cli.params import JSON_OPTION, duration
from towerctl.cli.progress import progress
from towerctl.cli.session import app
from towerctl.cli.state import connect, note, print_json
from towerctl.errors import BadInput
from towerctl.transcripts import purge as service


@app.command("purge")
def purge(
    ctx: typer.Context,
    expired_for: timedelta = typer.Option(
        ...,
        "--expired-for",
        metavar="DURATION",
        parser=duration,
        help="Only sessions expired at least this long ago (90s, 15m, 24h, 7d).",
        show_default=False,
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would go; delete nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete the messages of sessions expired at least DURATION ago (requests and ledger stay)."""

    conn = connect(ctx)
    if dry_run:
        done = service.count(conn, expired_for)
    else:
        planned = service.count(conn, expired_for) if not yes else None
        if planned is not None and planned.messages == 0:
            done = replace(planned, dry_run=False)  # nothing to delete: nothing to ask
        elif planned is not None:
            if not sys.stdin.isatty():
                raise BadInput("refusing to purge without --yes when not on a terminal")
            question = (
                f"Delete {planned.messages} message{'s' if planned.messages != 1 else ''} of "
                f"{planned.sessions} session{'s' if planned.sessions != 1 else ''} "
                f"expired for at least {_shown(expired_for)}?"
            )
            if not typer.confirm(question, err=True):
                raise BadInput("not confirmed; nothing deleted")
        if planned is None or planned.messages:
            with _progress_display() as progress:
                done = service.purge(conn, expired_for, progress=progress)
    if as_json:
        print_json(done.as_json())
        return
    verb = "would delete" if done.dry_run else "deleted"
    note(
        f"{verb} {done.messages} message{'s' if done.messages != 1 else ''} of "
        f"{done.sessions} session{'s' if done.sessions != 1 else ''}"
    )


def _shown(duration: timedelta) -> str:
    seconds = int(duration.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@contextmanager
def _progress_display() -> Iterator[Callable[[int, int, int], None] | None]:
    """Progress on stderr when a person watches it (see cli/progress.py)."""
    with progress("purging") as shown:
        if shown is None:
            yield None
            return

        def update(sessions: int, messages: int, total: int) -> None:
            shown(messages, total or None)

        yield update
