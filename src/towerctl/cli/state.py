"""What every command shares: the global options and the way to the database."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any

import typer

from towerctl import bounds
from towerctl.cli.output import Terminated, signals_raise
from towerctl.errors import BadInput
from towerctl.render import json_text
from towerctl.sanitize import escape_json_text

if TYPE_CHECKING:
    from towerctl.db import Connection
    from towerctl.store import Store

TOKEN_LIKE_CHARS = 32  # shorter text is never a usable macaroon (real ones are 100+)


class State:
    """The global options and what one invocation holds (a plain class: start-up matters)."""

    def __init__(
        self,
        database_url: str | None = None,
        read_database_url: str | None = None,
        traceback: bool = False,
        no_pager: bool = False,
    ) -> None:
        self.database_url = database_url
        self.read_database_url = read_database_url
        self.traceback = traceback
        self.no_pager = no_pager
        self.store: Store | None = None
        self.json_output = False  # --json was given: refusals are JSON documents too


# The invocation's state, for the one error handler (`cli.run`), which runs after
# every parser context has closed.
CURRENT: list[State] = []
ARGV: list[str] = []  # the invocation's words, so that no output echoes a token among them


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
        CURRENT[:] = [root.obj]
    return root.obj


def store(ctx: typer.Context) -> Store:
    """The command's way to the database (one per invocation, closed when it ends)."""
    shared = state(ctx)
    if shared.store is None:
        # The store brings the database client and the token code: loaded when a command
        # reaches the database, not for help, completion or a usage error.
        from towerctl.store import Store

        shared.store = Store(shared.database_url, shared.read_database_url)
        ctx.find_root().call_on_close(shared.store.close)
    return shared.store


def connect(ctx: typer.Context) -> Connection:
    """The primary: every write goes here."""
    return store(ctx).primary()


def read_connect(ctx: typer.Context) -> Connection:
    """The read replica when one is configured, else the primary."""
    return store(ctx).reader()


def print_json(value: Any) -> None:
    """A JSON document on stdout; hidden characters of outside text escaped (SPEC 11)."""

    sys.stdout.write(escape_json_text(json_text(value)) + "\n")


def note(message: str) -> None:
    """A diagnostic line on stderr (a token given on the command line is never echoed)."""
    sys.stderr.write(hide_tokens(message, ARGV) + "\n")


@contextlib.contextmanager
def ended_by_signals() -> Iterator[None]:
    """Inside, every signal that would end the process ends it as Ctrl-C does: the work
    in hand cleans up (files, leases, agents' processes, transactions), then one line on
    stderr and exit 128 + the signal's number."""
    try:
        with signals_raise():
            yield
    except Terminated as ended:
        note(f"towerctl: terminated ({ended.name})")
        raise typer.Exit(ended.exit_code) from None
    except KeyboardInterrupt:
        note("towerctl: interrupted")
        raise typer.Exit(130) from None


def _token_text(raw: bytes, source: str) -> str:
    """The first line of what a token source held, within the token bound."""

    limit = bounds.TOKEN_BYTES.whole_value()
    line = raw.split(b"\n", 1)[0]
    if len(line) > limit:
        raise BadInput(f"the macaroon from {source} is longer than {limit:,} bytes")
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadInput(f"the macaroon from {source} is not valid UTF-8") from None


def _read_token_line(stream: IO[bytes], source: str) -> str:
    # One line, at most the bound plus its newline: an endless stream is never read further.
    return _token_text(stream.readline(bounds.TOKEN_BYTES.whole_value() + 2), source)


def stdin_bytes() -> IO[bytes]:
    """Standard input as bytes (a text stream put in its place, as in tests, is encoded)."""

    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        return buffer  # type: ignore[no-any-return]
    return io.BytesIO(sys.stdin.read(1 << 24).encode("utf-8", "surrogateescape"))


def read_token(token: str | None, token_file: str | None = None) -> str | None:
    """A macaroon from `--macaroon`, `--macaroon-file` (`-` = stdin), TOWER_MACAROON or
    TOWER_MACAROON_FILE (a file holding it).

    A TOKEN argument of `-` also reads stdin, so tokens stay out of `ps` and shell history.
    Every source is bounded (`bounds.TOKEN_BYTES`): past it, exit 2.
    """

    if token == "-" or (not token and token_file == "-"):
        return _read_token_line(stdin_bytes(), "stdin")
    if token:
        return _token_text(token.encode("utf-8", "surrogateescape"), "--macaroon")
    if token_file:
        return _token_file(token_file, "--macaroon-file")
    env = os.environ.get("TOWER_MACAROON")
    if env:
        return _token_text(env.encode("utf-8", "surrogateescape"), "TOWER_MACAROON")
    env_file = os.environ.get("TOWER_MACAROON_FILE")
    return _token_file(env_file, "TOWER_MACAROON_FILE") if env_file else None


def _token_file(name: str, source: str) -> str:
    try:
        with open(name, "rb") as handle:
            return _read_token_line(handle, source)
    except OSError as error:
        raise BadInput(f"cannot read {source} {name}: {error.strerror or 'unreadable'}") from None


_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-+/=]+")
_TOKEN_RUN = re.compile(rf"[A-Za-z0-9_\-+/=]{{{TOKEN_LIKE_CHARS},}}")
HIDDEN = "<hidden>"
_UUID = re.compile(
    r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def token_like(value: str) -> bool:
    """True for text that could be a macaroon: a long run of base64/base64url characters
    that is neither a session id (UUID) nor a path."""
    if len(value) < TOKEN_LIKE_CHARS or value[0] in "/.~" or not _TOKEN_CHARS.fullmatch(value):
        return False
    return _UUID.fullmatch(value) is None


def hide_tokens(message: str, argv: Sequence[str], *, usage: bool = False) -> str:
    """`message` with every command-line value that could be a token replaced by
    `<hidden>`: a token misplaced as an extra argument or as another option's value is
    never echoed back. For usage errors (`usage`), any long token-like run is hidden too."""
    values = set()
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if token_like(value):
            values.add(value)
    for value in sorted(values, key=len, reverse=True):
        message = message.replace(value, HIDDEN)
    if usage:
        message = _TOKEN_RUN.sub(
            lambda m: m.group() if not token_like(m.group()) else HIDDEN, message
        )
    return message
