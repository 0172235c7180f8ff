"""`towerctl session messages` and `session clear-history`: a session's transcript."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar

import typer

from towerctl.cli.session import MACAROON_FILE_OPTION, MACAROON_OPTION, app, authorized_session
from towerctl.cli.state import connect

if TYPE_CHECKING:
    import psycopg

    from towerctl.transcripts import Format, Selection

T = TypeVar("T")


@app.command("messages")
def messages(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="ID"),
    fmt: str = typer.Option(
        "table", "--format", "-f", help="table, json, ndjson, csv or markdown."
    ),
    limit: int | None = typer.Option(None, "--limit", help="At most this many messages."),
    after: int | None = typer.Option(None, "--after", help="Only messages after this id."),
    before: int | None = typer.Option(None, "--before", help="Only messages before this id."),
    role: str | None = typer.Option(None, "--role", help="Only user or assistant messages."),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Write to FILE atomically (temporary file, then rename)."
    ),
    macaroon: str | None = MACAROON_OPTION,
    macaroon_file: str | None = MACAROON_FILE_OPTION,
) -> None:
    """Print or export a session's messages in order (needs a macaroon with scope read)."""

    from towerctl import sessions, transcripts
    from towerctl.errors import BadInput

    try:
        chosen = transcripts.Format(fmt)
    except ValueError:
        names = ", ".join(f.value for f in transcripts.Format)
        raise BadInput(f"--format must be one of {names}, got {fmt!r}") from None
    if output is not None:
        output = _output_path(output)
    conn, sid = authorized_session(ctx, session_id, macaroon, macaroon_file, "read")
    sessions.get_session(conn, sid)
    selection = transcripts.Selection(sid, after=after, before=before, role=role, limit=limit)
    transcripts.check_selection(conn, selection)
    # One snapshot for the page, its nextCursor and the progress total.
    import psycopg

    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    if output is None:
        with conn.transaction():
            _export(conn, selection, chosen, None)
        return
    from towerctl.cli.output import atomic_file

    with atomic_file(output) as handle, conn.transaction():
        written = _export(conn, selection, chosen, handle)
    from towerctl.cli.state import note

    note(f"wrote {written} message{'s' if written != 1 else ''} to {output}")


def _output_path(output: str) -> str:
    """The real file `-o` names (symlinks followed), or BadInput: it must be a regular
    file (new or existing) in a folder that exists; devices and pipes belong to `>`."""
    import os

    from towerctl.errors import BadInput

    path = os.path.realpath(output) if output else ""
    if not path or os.path.isdir(path):
        raise BadInput(f"-o {output!r} is not a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise BadInput(f"-o {output}: not a regular file (use shell redirection for devices)")
    if not os.path.isdir(os.path.dirname(path)):
        raise BadInput(f"-o {output}: the folder does not exist")
    return path


def _progress(rows: Iterator[T], total: int, enabled: bool) -> Iterator[T]:
    if not enabled:
        yield from rows
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(file=sys.stderr), transient=True) as progress:
        task = progress.add_task("exporting", total=total)
        for n, row in enumerate(rows, start=1):
            yield row
            if n % 5_000 == 0:
                progress.update(task, completed=n)


def _export(
    conn: psycopg.Connection, selection: Selection, fmt: Format, handle: IO[bytes] | None
) -> int:
    """Write the selection in `fmt` to `handle` (a file) or stdout; returns the message count."""
    import io
    import os

    from towerctl import render, transcripts
    from towerctl.cli.output import binary_stdout

    out: Any = handle if handle is not None else binary_stdout()
    show_progress = (
        handle is not None
        and sys.stderr.isatty()
        and sys.stdout.isatty()
        and not os.environ.get("NO_COLOR")
    )
    total = transcripts.count(conn, selection) if show_progress else 0
    show_progress = show_progress and total >= 50_000
    cursor = transcripts.next_cursor(conn, selection)
    sid = str(selection.session_id)
    if fmt in (transcripts.Format.ndjson, transcripts.Format.csv):
        rows = _progress(transcripts.copy_rows(conn, selection, fmt), total, show_progress)
        written = render.write_json_lines(rows, out)
        if fmt is transcripts.Format.csv:
            written -= 1  # the header row
    elif fmt is transcripts.Format.json:
        rows = _progress(transcripts.copy_rows(conn, selection, fmt), total, show_progress)
        written = render.write_transcript_json(sid, rows, cursor, out)
    else:
        wrapper = io.TextIOWrapper(handle, encoding="utf-8") if handle is not None else None
        text: IO[str] = wrapper if wrapper is not None else sys.stdout
        messages = _progress(transcripts.iter_messages(conn, selection), total, show_progress)
        if fmt is transcripts.Format.markdown:
            written = render.write_transcript_markdown(sid, messages, text, cursor)
        else:
            color = handle is None and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
            width = _terminal_width() if handle is None else 100
            written = render.write_transcript_table(messages, text, color=color, width=width)
        text.flush()
        if wrapper is not None:
            wrapper.detach()
    if cursor is not None and fmt is not transcripts.Format.json and handle is None:
        from towerctl.cli.state import note

        note(f"more messages follow: --after {cursor}")
    return written


def _terminal_width() -> int:
    import shutil

    return max(shutil.get_terminal_size((100, 24)).columns, 60)


@app.command("clear-history")
def clear_history(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="ID"),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    macaroon: str | None = MACAROON_OPTION,
    macaroon_file: str | None = MACAROON_FILE_OPTION,
) -> None:
    """Delete a session's messages (not its requests or ledger), recording when and by whom."""
    from towerctl import auth, keys, sessions
    from towerctl.cli.state import note, read_token
    from towerctl.config import RequestLimits
    from towerctl.errors import BadInput
    from towerctl.history import clear_history as clear
    from towerctl.units import parse_session_id

    sid = parse_session_id(session_id)
    token = read_token(macaroon, macaroon_file)
    conn = connect(ctx)
    info = auth.authorize(conn, keys.load_ring(), token, session_id=str(sid), scope="request")
    sessions.get_session(conn, sid)
    if not yes:
        if not sys.stdin.isatty():
            raise BadInput("refusing to clear history without --yes when not on a terminal")
        if not typer.confirm(f"Delete every message of session {sid}?", err=True):
            raise BadInput("not confirmed; nothing deleted")
    deleted = clear(conn, sid, info.identifier, RequestLimits.from_env().busy_wait_seconds)
    note(f"deleted {deleted} message{'s' if deleted != 1 else ''} of session {sid}")
