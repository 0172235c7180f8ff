"""`towerctl session`: open, show, list and top up sessions; requests and transcripts."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from uuid import UUID

import typer

from towerctl import config, sessions
from towerctl.auth import keys, macaroons
from towerctl.cli.params import (
    JSON_OPTION,
    SessionState,
    count_option,
    sats_option,
    session_id_argument,
)
from towerctl.cli.state import connect, print_json, read_connect, read_token, store
from towerctl.render import iso, write_key_values
from towerctl.units import parse_session_id

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
    session_id: UUID = session_id_argument(),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one session: state, balance, expiry."""

    _show(sessions.get_session(read_connect(ctx), session_id), as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    state: SessionState | None = typer.Option(None, "--state", help="Only sessions in this state."),
    limit: int = count_option(50, "--limit", 10_000, "At most this many (newest first)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List sessions, newest first."""

    found = sessions.list_sessions(read_connect(ctx), state=state, limit=limit)
    if as_json:
        print_json({"sessions": [s.as_json() for s in found]})
        return
    for s in found:
        sys.stdout.write(
            f"{s.id}  {s.state:<16} {s.balance_sats:>12} sats  expires {iso(s.expires_at)}\n"
        )


@app.command("topup")
def topup(
    ctx: typer.Context,
    session_id: UUID = session_id_argument(),
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
    session_id: str | UUID,
    token: str | None,
    token_file: str | None,
    scope: str,
) -> tuple[Connection, UUID]:
    """(connection, session UUID) once the macaroon authorises `scope` on the session:
    the read replica's connection for `read` (when one is configured), else the primary's."""

    sid = session_id if isinstance(session_id, UUID) else parse_session_id(session_id)
    grant = store(ctx).authorize(read_token(token, token_file), sid, scope)
    return grant.conn, grant.session_id
