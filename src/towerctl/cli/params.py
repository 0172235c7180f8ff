"""Parameter parsing through Typer's public API, so command bodies receive typed values.

Sats, counts and message ids are `int` options with `min=`/`max=`; choices are
`Literal`s; session ids and durations are `parser=` callables that raise
`typer.BadParameter`. A bad value is a usage error (exit 2) naming the parameter.
Messages never quote the value itself: a misplaced token must not be echoed
(SPEC 11), and the user can see what they typed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

import typer

from towerctl.cli.state import state
from towerctl.completion import session_ids
from towerctl.errors import BadInput
from towerctl.units import MAX_SATS, parse_duration, parse_session_id

# The services' names (`sessions.STATES`, `transcripts.ROLES`) as types Typer parses;
# tests/test_help.py checks that they stay the same.
SessionState = Literal["awaiting_payment", "active", "paused", "expired"]
Role = Literal["user", "assistant"]

MAX_MESSAGE_ID = 2**63 - 1  # a bigint


def session_id(value: Any) -> UUID:
    """A session id (a UUID) from the command line."""
    if isinstance(value, UUID):
        return value
    try:
        return parse_session_id(str(value))
    except BadInput:
        raise typer.BadParameter("not a session id (a UUID)") from None


def duration(value: Any) -> timedelta:
    """A duration such as 90s, 15m, 24h or 7d from the command line."""
    if isinstance(value, timedelta):
        return value
    try:
        return parse_duration(str(value))
    except BadInput:
        raise typer.BadParameter("must look like 90s, 15m, 24h or 7d (at most 366d)") from None


def recent_session_ids(ctx: typer.Context, incomplete: str) -> list[str]:
    """Recent session ids from the store, when one is at hand (never starts a server)."""

    url = ctx.find_root().params.get("database_url")
    return session_ids(incomplete, url)


def _remember_json(ctx: typer.Context, value: bool) -> bool:
    """With --json, a refusal is a JSON document on stdout too (`cli.run` writes it)."""
    if value:
        state(ctx).json_output = True
    return value


JSON_OPTION = typer.Option(
    False,
    "--json",
    help='Print JSON; a refusal prints {"error": {"message", "exitCode"}}.',
    callback=_remember_json,
)


def session_id_argument(metavar: str = "ID") -> Any:
    return typer.Argument(
        ...,
        metavar=metavar,
        parser=session_id,
        autocompletion=recent_session_ids,
        show_default=False,
    )


def session_id_option(flag: str, help: str) -> Any:
    return typer.Option(
        None,
        flag,
        metavar="UUID",
        parser=session_id,
        autocompletion=recent_session_ids,
        help=help,
        show_default=False,
    )


def duration_option(default: str | None, flag: str, help: str) -> Any:
    return typer.Option(default, flag, metavar="DURATION", parser=duration, help=help)


def sats_option(flag: str, help: str) -> Any:
    return typer.Option(..., flag, min=1, max=MAX_SATS, help=f"{help} (1 to {MAX_SATS:,}).")


def count_option(default: int | None, flag: str, most: int, help: str) -> Any:
    return typer.Option(default, flag, min=1, max=most, help=help)


def message_id_option(flag: str, help: str) -> Any:
    return typer.Option(None, flag, min=1, max=MAX_MESSAGE_ID, help=help)
