"""Parameter types: Click parses, so command bodies receive typed values.

A bad value is a usage error (exit 2) raised by Click with the parameter's name.
Messages never quote the value itself: a misplaced token must not be echoed
(SPEC 11), and the user can see what they typed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import click
import typer
from click.shell_completion import CompletionItem

from towerctl.errors import BadInput
from towerctl.units import MAX_SATS, parse_duration, parse_session_id


class SessionIdType(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.5
    name = "UUID"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> UUID:
        if isinstance(value, UUID):
            return value
        try:
            return parse_session_id(str(value))
        except BadInput:
            self.fail("not a session id (a UUID)", param, ctx)

    def shell_complete(
        self, ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        """Recent session ids from the store, when one is at hand (never starts a server)."""
        from towerctl.completion import session_ids

        url = ctx.find_root().params.get("database_url")
        return [CompletionItem(sid) for sid in session_ids(incomplete, url)]


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except BadInput:
            self.fail("must look like 90s, 15m, 24h or 7d (at most 366d)", param, ctx)


SESSION_ID = SessionIdType()
MESSAGE_ID = click.IntRange(1, 2**63 - 1)
DURATION = DurationType()
SATS = click.IntRange(1, MAX_SATS)


def _remember_json(ctx: typer.Context, value: bool) -> bool:
    """With --json, a refusal is a JSON document on stdout too (`cli.run` writes it)."""
    if value:
        from towerctl.cli.state import state

        state(ctx).json_output = True
    return value


JSON_OPTION = typer.Option(
    False,
    "--json",
    help='Print JSON; a refusal prints {"error": {"message", "exitCode"}}.',
    callback=_remember_json,
)


def session_id_argument(metavar: str = "ID") -> Any:
    return typer.Argument(..., metavar=metavar, click_type=SESSION_ID, show_default=False)


def sats_option(flag: str, help: str) -> Any:
    return typer.Option(..., flag, click_type=SATS, help=f"{help} (1 to {MAX_SATS:,}).")
