"""What every command shares: the global options and the way to the database."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import psycopg


@dataclass
class State:
    database_url: str | None = None
    traceback: bool = False


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def resolve_url(ctx: typer.Context) -> str:
    """The configured database URL, or the embedded server's (started if needed)."""
    from towerctl import config, embedded

    url = config.database_url(state(ctx).database_url)
    if url:
        return url
    return embedded.ensure_running(config.home()).url


def connect(ctx: typer.Context) -> psycopg.Connection:
    from towerctl import db

    conn = db.connect(resolve_url(ctx))
    ctx.call_on_close(conn.close)
    return conn


def print_json(value: Any) -> None:
    from towerctl.render import write_json

    write_json(value, sys.stdout)


def note(message: str) -> None:
    """A diagnostic line on stderr."""
    sys.stderr.write(message + "\n")
