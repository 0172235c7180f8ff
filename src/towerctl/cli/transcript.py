"""`towerctl session messages` and `session clear-history`: a session's transcript."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import UUID

import typer

from towerctl import auth, session_ids, sessions, transcripts
from towerctl.auth import keys
from towerctl.cli.outfile import STDOUT, atomic_file, resolve_output
from towerctl.cli.output import binary_stdout, sigterm_raises
from towerctl.cli.pager import paged
from towerctl.cli.params import (
    Role,
    count_option,
    json_option,
    message_id_option,
    session_id_argument,
)
from towerctl.cli.progress import progress
from towerctl.cli.session import MACAROON_FILE_OPTION, MACAROON_OPTION, app, authorized_session
from towerctl.cli.state import ended_by_signals, note, read_token, state, store
from towerctl.config import RequestLimits
from towerctl.errors import BadInput, Unauthorized
from towerctl.session_ids import SessionRef
from towerctl.transcripts import MAX_PAGE, Format, Selection, export, follow
from towerctl.transcripts.history import clear_history as clear


@app.command("messages")
def messages(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument(),
    fmt: Format = typer.Option(Format.table, "--format", "-f", help="Output format."),
    as_json: bool = json_option("The same as --format json."),
    limit: int | None = count_option(
        None, "--limit", MAX_PAGE, "At most this many messages: the first of the selection."
    ),
    last: int | None = count_option(
        None,
        "--last",
        MAX_PAGE,
        "The last N messages of the selection, printed in order (not with --limit).",
    ),
    after: int | None = message_id_option("--after", "Only messages after this id."),
    before: int | None = message_id_option("--before", "Only messages before this id."),
    role: Role | None = typer.Option(None, "--role", help="Only this role's messages."),
    output: str | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Write to FILE atomically (temporary file, then rename); '-', /dev/stdout, "
        "/dev/stderr and devices are written to as streams.",
    ),
    raw: bool = typer.Option(
        False,
        "--raw",
        help="CSV: keep cells starting with = + - @ tab or CR as they are "
        "(by default they get a leading ' so spreadsheets do not run them).",
    ),
    follow: bool = typer.Option(
        False,
        "--follow",
        help="Then keep printing new messages as they commit, until Ctrl-C or the session "
        "expires (ndjson and table; reads the primary).",
    ),
    macaroon: str | None = MACAROON_OPTION,
    macaroon_file: str | None = MACAROON_FILE_OPTION,
) -> None:
    """Print or export a session's messages in order (needs a macaroon with scope read)."""

    if as_json and fmt not in (Format.table, Format.json):
        raise BadInput(f"--json and --format {fmt.value} cannot be used together")
    chosen = fmt = Format.json if as_json else fmt
    if limit is not None and last is not None:
        raise BadInput("--limit and --last cannot be used together")

    def selection_of(sid: UUID) -> Selection:
        return Selection(sid, after=after, before=before, role=role, limit=limit, last=last)

    if follow:
        _follow(ctx, session_id, selection_of, fmt, output, macaroon, macaroon_file)
        return
    target = STDOUT if output is None else resolve_output(output)
    conn, sid = authorized_session(ctx, session_id, macaroon, macaroon_file, "read")
    selection = selection_of(sid)
    transcripts.check_selection(conn, selection)
    try:
        with ended_by_signals():
            if target.path is None:
                fd = 1 if target.fd is None else target.fd
                on_terminal = binary_stdout(fd).isatty()
                options = export.Options(
                    chosen,
                    raw=raw,
                    visible=on_terminal,
                    color=on_terminal and not os.environ.get("NO_COLOR"),
                    width=_terminal_width(),
                )
                with paged(enabled=fd == 1 and not state(ctx).no_pager):
                    done = export.export(conn, selection, options, binary_stdout(fd))
            else:
                options = export.Options(chosen, raw=raw)
                with atomic_file(target.path) as handle, _progress_bar() as progress:
                    done = export.export(conn, selection, options, handle, progress=progress)
    finally:
        target.close()
    if target.path is not None:
        count = done.messages
        note(f"wrote {count} message{'s' if count != 1 else ''} to {target.path}")
    elif done.next_cursor is not None and chosen is not transcripts.Format.json:
        note(f"more messages follow: --after {done.next_cursor}")


def _follow(
    ctx: typer.Context,
    session_id: SessionRef,
    selection_of: Callable[[UUID], Selection],
    fmt: Format,
    output: str | None,
    macaroon: str | None,
    macaroon_file: str | None,
) -> None:
    """`--follow`: on the primary (notifications and the writes in flight live there)."""
    if output not in (None, "-"):
        raise BadInput("--follow writes to standard output only (not -o FILE)")
    follow.check_follow(selection_of(session_id.lower), fmt)  # paging flags only, not the id
    token = read_token(macaroon, macaroon_file)
    sid = session_ids.resolve_for_token(session_id, token)
    if sid is None:  # the token's own check says why it is refused
        auth.authorize(store(ctx).primary(), keys.load_ring(), token, scope="read")
        raise Unauthorized("macaroon refused: it names no session")
    selection = selection_of(sid)
    access = follow.Access(keys.load_ring(), token, selection.session_id)
    conn = store(ctx).primary()
    auth.authorize(conn, access.ring, token, session_id=str(selection.session_id), scope="read")
    sessions.get_session(conn, selection.session_id)
    transcripts.check_selection(conn, selection)
    out = binary_stdout()
    on_terminal = out.isatty()
    options = export.Options(
        fmt,
        visible=on_terminal,
        color=on_terminal and not os.environ.get("NO_COLOR"),
        width=_terminal_width(),
    )
    try:
        with sigterm_raises():  # SIGTERM ends the follow like Ctrl-C: normally, exit 0
            follow.follow(conn, store(ctx).url(), access, selection, options, out)
    except KeyboardInterrupt:
        pass  # interrupted while starting: as normal an end as one while following


@contextmanager
def _progress_bar() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr while exporting to a file from a terminal."""
    with progress("exporting") as shown:
        if shown is None or not sys.stdout.isatty():
            yield None
            return

        def update(done: int, total: int) -> None:
            shown(done, total)

        yield update


def _terminal_width() -> int:
    return max(shutil.get_terminal_size((100, 24)).columns, 60)


@app.command("clear-history")
def clear_history(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument(),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    macaroon: str | None = MACAROON_OPTION,
    macaroon_file: str | None = MACAROON_FILE_OPTION,
) -> None:
    """Delete a session's messages (not its requests or ledger), recording when and by whom."""

    grant = store(ctx).authorize(read_token(macaroon, macaroon_file), session_id, "request")
    conn, sid, info = grant.conn, grant.session_id, grant.token
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("refusing to clear history without --yes when not on a terminal")
        if not typer.confirm(f"Delete every message of session {sid}?", err=True):
            raise BadInput("not confirmed; nothing deleted")
    deleted = clear(conn, sid, info.identifier, RequestLimits.from_env().busy_wait_seconds)
    note(f"deleted {deleted} message{'s' if deleted != 1 else ''} of session {sid}")


# `session purge` lives in its own module; importing it registers it on `session`.
from towerctl.cli import purge as _purge  # noqa: E402, F401
