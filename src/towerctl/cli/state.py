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
    from towerctl import config

    url = config.database_url(state(ctx).database_url)
    if url:
        return url
    from towerctl import embedded

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


def read_token(token: str | None, token_file: str | None = None) -> str | None:
    """A macaroon from `--macaroon`, `--macaroon-file` (`-` = stdin) or TOWER_MACAROON.

    A TOKEN argument of `-` also reads stdin, so tokens stay out of `ps` and shell history.
    """
    import os

    from towerctl.errors import BadInput

    if token == "-":
        return sys.stdin.readline().strip()
    if token:
        return token
    if token_file:
        if token_file == "-":
            return sys.stdin.readline().strip()
        try:
            with open(token_file, encoding="utf-8") as handle:
                return handle.readline().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise BadInput(
                f"cannot read --macaroon-file {token_file}: {type(error).__name__}"
            ) from None
    return os.environ.get("TOWER_MACAROON") or None
