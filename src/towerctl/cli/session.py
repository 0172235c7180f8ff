"""`towerctl session`: open, show, list and top up sessions; requests and transcripts."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal
from uuid import UUID

import typer

from towerctl import config, session_list, sessions
from towerctl.auth import keys, macaroons
from towerctl.cli.params import (
    JSON_OPTION,
    SessionState,
    count_option,
    moment_option,
    sats_option,
    session_id_argument,
    session_id_option,
)
from towerctl.cli.state import connect, note, print_json, read_connect, read_token, store
from towerctl.render import write_key_values, write_session_rows
from towerctl.session_ids import SessionRef, parse

if TYPE_CHECKING:
    from towerctl.db import Connection
    from towerctl.sessions import Session


app = typer.Typer(help="Sessions: balances, requests and transcripts.", no_args_is_help=True)

__all__ = ["JSON_OPTION", "app", "authorized_session"]


def _show(session: Session, as_json: bool, extra: dict[str, str] | None = None) -> None:
    doc = session.as_json() | (extra or {})
    if as_json:
        print_json(doc)
    else:
        write_key_values(doc, sys.stdout)


@app.command("open")
def open_(
    ctx: typer.Context,
    deposit: int = sats_option("--deposit", "Sats to deposit"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Open an active session holding DEPOSIT sats; print its id and a read,request macaroon."""

    ring = keys.load_ring(create=True)
    session = sessions.open_session(connect(ctx), deposit)
    token = macaroons.mint(
        ring,
        session.id,
        macaroons.SCOPES,
        datetime.now(UTC) + timedelta(hours=24),
        location=config.macaroon_location(),
    )
    _show(session, as_json, {"macaroon": token})


@app.command("show")
def show(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument(),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one session: state, balance, expiry."""

    _show(sessions.get_session(read_connect(ctx), session_id), as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    state: SessionState | None = typer.Option(None, "--state", help="Only sessions in this state."),
    since: datetime | None = moment_option("--since", "Created at or after: ISO or 12h, 1d ago."),
    until: datetime | None = moment_option("--until", "Created before this time."),
    sort: Literal["created", "activity"] = typer.Option(
        "created", "--sort", help="Newest first by creation or by last activity."
    ),
    limit: int = count_option(50, "--limit", 10_000, "At most this many (newest first)."),
    after: SessionRef | None = session_id_option(
        "--after", "The cursor a page before ended with (a session id)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """List sessions, newest first; a page at a time (--after)."""
    page = session_list.list_page(
        read_connect(ctx), state=state, since=since, until=until, sort=sort, limit=limit,
        after=after,
    )  # fmt: skip
    if as_json:
        print_json(page.as_json())
        return
    write_session_rows(page.sessions, sys.stdout, activity=sort == "activity")
    if page.next_cursor is not None:
        note(f"more sessions follow: --after {page.next_cursor}")


@app.command("topup")
def topup(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument(),
    sats: int = sats_option("--sats", "Sats to add"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add sats to a session; a paused session becomes active. Expired sessions take nothing."""

    _show(sessions.top_up(connect(ctx), session_id, sats), as_json)


MACAROON_OPTION = typer.Option(
    None,
    "--macaroon",
    help="The session's macaroon [env: TOWER_MACAROON]; --macaroon-file keeps it out of ps.",
    show_default=False,
)
MACAROON_FILE_OPTION = typer.Option(
    None,
    "--macaroon-file",
    help="Read the macaroon from this file (- = stdin) [env: TOWER_MACAROON_FILE].",
    show_default=False,
)


def authorized_session(
    ctx: typer.Context,
    session_id: str | UUID | SessionRef,
    token: str | None,
    token_file: str | None,
    scope: str,
) -> tuple[Connection, UUID]:
    """(connection, session UUID) once the macaroon authorises `scope` on the session:
    the read replica's connection for `read` (when one is configured), else the primary's."""
    sid = parse(session_id) if isinstance(session_id, str) else session_id
    grant = store(ctx).authorize(read_token(token, token_file), sid, scope)
    return grant.conn, grant.session_id


# `session requests` and `session find` live in their own module; importing it registers them.
from towerctl.cli import support as _support  # noqa: E402, F401
