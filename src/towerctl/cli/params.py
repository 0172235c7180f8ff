"""Parameter parsing through Typer's public API, so command bodies receive typed values.

Sats, counts and message ids are `int` options with `min=`/`max=`; choices are
`Literal`s; session ids and durations are `parser=` callables that raise
`typer.BadParameter`. A bad value is a usage error (exit 2) naming the parameter.
Messages never quote the value itself: a misplaced token must not be echoed
(SPEC 11), and the user can see what they typed.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import typer

from towerctl.cli.state import state
from towerctl.completion import session_ids
from towerctl.errors import BadInput
from towerctl.session_ids import SessionRef, parse
from towerctl.times import parse_moment
from towerctl.units import MAX_SATS, parse_duration

# The services' names (`sessions.STATES`, `transcripts.ROLES`) as types Typer parses;
# tests/cli/test_help.py checks that they stay the same.
SessionState = Literal["awaiting_payment", "active", "paused", "expired"]
Role = Literal["user", "assistant"]

MAX_MESSAGE_ID = 2**63 - 1  # a bigint


def session_id(value: Any) -> SessionRef:
    """A session id from the command line: a UUID, or a unique prefix of 8+ hex digits
    (resolved by the service once the command has its connection)."""
    if isinstance(value, SessionRef):
        return value
    if isinstance(value, UUID):
        return SessionRef(value.hex, value)
    try:
        return parse(str(value))
    except BadInput as refused:
        raise typer.BadParameter(refused.message) from None


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


def json_option(
    help: str = 'Print JSON; an error prints {"error": {"message", "exitCode"}}.',
) -> Any:
    return typer.Option(False, "--json", help=help, callback=_remember_json)


JSON_OPTION = json_option()


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
        metavar="ID",
        parser=session_id,
        autocompletion=recent_session_ids,
        help=help,
        show_default=False,
    )


def whole_number(low: int, high: int) -> Any:
    """A parser for a whole number from `low` to `high`, written in ASCII digits only
    (Python's int() would take other scripts' digits and `1_000`; other tools would not)."""

    def parse(value: Any) -> int:
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 20:
            number = int(value)
        else:
            raise typer.BadParameter(f"must be a whole number from {low:,} to {high:,}")
        if not low <= number <= high:
            raise typer.BadParameter(f"must be a whole number from {low:,} to {high:,}")
        return number

    return parse


def duration_option(default: str | None, flag: str, help: str) -> Any:
    return typer.Option(default, flag, metavar="DURATION", parser=duration, help=help)


def sats_option(flag: str, help: str) -> Any:
    return typer.Option(
        ..., flag, metavar="SATS", parser=whole_number(1, MAX_SATS),
        help=f"{help} (1 to {MAX_SATS:,}).",
    )  # fmt: skip


def count_option(default: int | None, flag: str, most: int, help: str) -> Any:
    return typer.Option(
        default, flag, metavar="N", parser=whole_number(1, most), help=f"{help} (1 to {most:,})"
    )


def message_id_option(flag: str, help: str) -> Any:
    return typer.Option(
        None, flag, metavar="MSG_ID", parser=whole_number(1, MAX_MESSAGE_ID), help=help
    )


def moment_option(flag: str, help: str) -> Any:
    """A point in time: an ISO time or a duration ago (`12h`, `1d`)."""

    def moment(value: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_moment(str(value), flag)
        except BadInput as refused:
            raise typer.BadParameter(refused.message) from None

    return typer.Option(None, flag, metavar="TIME", parser=moment, help=help, show_default=False)
