"""`towerctl session`: open, show, list and top up sessions; requests and transcripts."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import typer

from towerctl.cli.state import connect, print_json

if TYPE_CHECKING:
    import psycopg

    from towerctl.agents import Agent
    from towerctl.config import Pricing, RequestLimits
    from towerctl.transcripts import Format, Selection

T = TypeVar("T")

app = typer.Typer(help="Sessions: balances, requests and transcripts.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON.")


def _show(session: object, as_json: bool, extra: dict[str, str] | None = None) -> None:
    from towerctl.render import write_key_values
    from towerctl.sessions import Session

    assert isinstance(session, Session)
    doc = session.as_json() | (extra or {})
    if as_json:
        print_json(doc)
    else:
        write_key_values(doc, sys.stdout)


@app.command("open")
def open_(
    ctx: typer.Context,
    deposit: int = typer.Option(..., "--deposit", help="Sats to deposit (1 to 100,000,000)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Open an active session holding DEPOSIT sats; print its id and a read,request macaroon."""
    from datetime import UTC, datetime, timedelta

    from towerctl import config, keys, macaroons, sessions
    from towerctl.units import parse_sats

    sats = parse_sats(deposit, "--deposit")
    ring = keys.load_ring()
    session = sessions.open_session(connect(ctx), sats)
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
    session_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one session: state, balance, expiry."""
    from towerctl import sessions
    from towerctl.units import parse_session_id

    _show(sessions.get_session(connect(ctx), parse_session_id(session_id)), as_json)


@app.command("list")
def list_(
    ctx: typer.Context,
    state: str | None = typer.Option(
        None, "--state", help="awaiting_payment, active, paused or expired."
    ),
    limit: int = typer.Option(50, "--limit", help="At most this many (newest first)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List sessions, newest first."""
    from towerctl import sessions
    from towerctl.render import iso

    found = sessions.list_sessions(connect(ctx), state=state, limit=limit)
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
    session_id: str = typer.Argument(..., metavar="ID"),
    sats: int = typer.Option(..., "--sats", help="Sats to add (1 to 100,000,000)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Add sats to a session; a paused session becomes active. Expired sessions take nothing."""
    from towerctl import sessions
    from towerctl.units import parse_sats, parse_session_id

    sid = parse_session_id(session_id)
    amount = parse_sats(sats, "--sats")
    _show(sessions.top_up(connect(ctx), sid, amount), as_json)


MACAROON_OPTION = typer.Option(
    None,
    "--macaroon",
    help="The session's macaroon [env: TOWER_MACAROON]; --macaroon-file keeps it out of ps.",
    show_default=False,
)
MACAROON_FILE_OPTION = typer.Option(
    None,
    "--macaroon-file",
    help="Read the macaroon from this file (- = stdin).",
    show_default=False,
)


def _authorized_session(
    ctx: typer.Context, session_id: str, token: str | None, token_file: str | None, scope: str
) -> tuple[psycopg.Connection, UUID]:
    """(connection, session UUID) once the macaroon authorises `scope` on the session."""
    from towerctl import auth, keys
    from towerctl.cli.state import read_token
    from towerctl.units import parse_session_id

    sid = parse_session_id(session_id)
    macaroon = read_token(token, token_file)
    conn = connect(ctx)
    auth.authorize(conn, keys.load_ring(), macaroon, session_id=str(sid), scope=scope)
    return conn, sid


def _read_stdin_message() -> str:
    from towerctl.errors import BadInput

    stream = getattr(sys.stdin, "buffer", None)
    if stream is not None:
        try:
            text: str = bytes(stream.read()).decode("utf-8")
        except UnicodeDecodeError:
            raise BadInput("the message on stdin is not valid UTF-8") from None
    else:
        text = str(sys.stdin.read())
    return text[:-1] if text.endswith("\n") else text


@app.command("request")
def request(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., metavar="ID"),
    message: str | None = typer.Argument(
        None, metavar="[MESSAGE|-]", help="The message; - or nothing reads it from stdin."
    ),
    agent: str | None = typer.Option(
        None, "--agent", help="echo (default), exec:COMMAND or openai:BASE_URL [env: TOWER_AGENT]."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Model for openai: agents [env: TOWER_OPENAI_MODEL]."
    ),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="A retry with the same key returns the first outcome."
    ),
    batch: bool = typer.Option(
        False, "--batch", help='Read NDJSON requests ({"message", "idempotencyKey"}) from stdin.'
    ),
    as_json: bool = JSON_OPTION,
    macaroon: str | None = MACAROON_OPTION,
    macaroon_file: str | None = MACAROON_FILE_OPTION,
) -> None:
    """Run a request on a session: the reply on stdout; exit 0, 5 (rejected) or 6 (failed)."""
    from towerctl import requests
    from towerctl.agents import agent_from_spec
    from towerctl.config import Pricing, RequestLimits
    from towerctl.errors import AgentFailed, BadInput, NotServed

    pricing, limits = Pricing.from_env(), RequestLimits.from_env()
    chosen = agent_from_spec(agent, model=model, timeout=limits.agent_timeout_seconds)
    reads_stdin = batch or message in (None, "-")
    if reads_stdin and macaroon_file == "-":
        raise BadInput("stdin cannot carry both the macaroon and the request")
    if batch:
        if message is not None or idempotency_key is not None:
            raise BadInput("--batch reads messages and keys from stdin; give neither on the line")
        conn, sid = _authorized_session(ctx, session_id, macaroon, macaroon_file, "request")
        _run_batch(conn, sid, chosen, pricing, limits)
        return
    text = message if message not in (None, "-") else _read_stdin_message()
    assert text is not None
    requests.validate_message(text, limits)
    requests.validate_idempotency_key(idempotency_key)
    conn, sid = _authorized_session(ctx, session_id, macaroon, macaroon_file, "request")
    outcome = requests.run_request(
        conn,
        sid,
        text,
        chosen,
        idempotency_key=idempotency_key,
        pricing=pricing,
        limits=limits,
    )
    if as_json:
        print_json(outcome.as_json())
    elif outcome.state == "complete":
        sys.stdout.write((outcome.result or "") + "\n")
    if outcome.state == "rejected":
        raise NotServed(f"request rejected: {outcome.reason}")
    if outcome.state == "failed":
        raise AgentFailed(f"agent failed: {outcome.error_message}")


def _run_batch(
    conn: psycopg.Connection,
    sid: UUID,
    agent: Agent,
    pricing: Pricing,
    limits: RequestLimits,
) -> None:
    """One NDJSON result per input line, in order; exit with the largest code seen."""
    import json

    from towerctl import requests
    from towerctl.errors import AgentFailed, BadInput, ExitCode, NotServed
    from towerctl.render import json_text

    counts = {"complete": 0, "rejected": 0, "failed": 0}
    worst = ExitCode.OK
    out = sys.stdout
    for number, raw in enumerate(sys.stdin, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise BadInput(f"line {number}: not valid JSON") from None
        if not isinstance(item, dict) or not isinstance(item.get("message"), str):
            raise BadInput(f'line {number}: expected an object with a "message" string')
        key = item.get("idempotencyKey")
        if key is not None and not isinstance(key, str):
            raise BadInput(f"line {number}: idempotencyKey must be a string")
        try:
            outcome = requests.run_request(
                conn,
                sid,
                item["message"],
                agent,
                idempotency_key=key,
                pricing=pricing,
                limits=limits,
            )
        except BadInput as error:
            raise BadInput(f"line {number}: {error}") from None
        except NotServed as refused:
            doc = {
                "requestId": None,
                "sessionId": str(sid),
                "state": "rejected",
                "result": None,
                "reason": str(refused),
                "errorMessage": None,
                "debitedSats": 0,
                "balanceRemaining": None,
                "inputTokens": 0,
                "outputTokens": 0,
            }
            out.write(json_text(doc, compact=True) + "\n")
            out.flush()
            counts["rejected"] += 1
            worst = max(worst, ExitCode.NOT_SERVED)
            continue
        out.write(json_text(outcome.as_json(), compact=True) + "\n")
        out.flush()
        counts[outcome.state] += 1
        if outcome.state == "rejected":
            worst = max(worst, ExitCode.NOT_SERVED)
        elif outcome.state == "failed":
            worst = max(worst, ExitCode.AGENT_FAILED)
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    if worst == ExitCode.AGENT_FAILED:
        raise AgentFailed(f"batch: {summary}")
    if worst == ExitCode.NOT_SERVED:
        raise NotServed(f"batch: {summary}")


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
    import os

    from towerctl import sessions, transcripts
    from towerctl.errors import BadInput

    try:
        chosen = transcripts.Format(fmt)
    except ValueError:
        names = ", ".join(f.value for f in transcripts.Format)
        raise BadInput(f"--format must be one of {names}, got {fmt!r}") from None
    if output is not None and (not output or os.path.isdir(output)):
        raise BadInput(f"-o {output!r} is not a file name")
    if output is not None and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise BadInput(f"-o {output}: the folder does not exist")
    conn, sid = _authorized_session(ctx, session_id, macaroon, macaroon_file, "read")
    sessions.get_session(conn, sid)
    selection = transcripts.Selection(sid, after=after, before=before, role=role, limit=limit)
    transcripts.check_selection(conn, selection)
    if output is None:
        _export(conn, selection, chosen, None)
        return
    from towerctl.cli.output import atomic_file

    with atomic_file(output) as handle:
        written = _export(conn, selection, chosen, handle)
    from towerctl.cli.state import note

    note(f"wrote {written} message{'s' if written != 1 else ''} to {output}")


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
    show_progress = handle is not None and sys.stderr.isatty()
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
