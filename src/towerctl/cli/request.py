"""`towerctl session request`: one request, or a batch of them from NDJSON."""

from __future__ import annotations

import fcntl
import os
import select
import stat
import struct
import sys
import termios
import time
from typing import Any

import typer

from towerctl import bounds
from towerctl.agents import agent_from_spec
from towerctl.cli.output import StdoutClosed
from towerctl.cli.params import json_option, session_id_argument
from towerctl.cli.progress import progress
from towerctl.cli.session import (
    MACAROON_FILE_OPTION,
    MACAROON_OPTION,
    app,
    authorized_session,
)
from towerctl.cli.state import ended_by_signals, print_json, stdin_bytes
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import AgentFailed, BadInput, NotServed, WriteFailed
from towerctl.render import json_text
from towerctl.requests import batch as batches
from towerctl.requests import rules as request_rules
from towerctl.requests import serve as session_requests
from towerctl.sanitize import escape_json_text, for_terminal
from towerctl.session_ids import SessionRef


def _reply_text(text: str) -> str:
    """The reply as printed: exact on a pipe or file (it is data); on a terminal every
    hidden character (escape sequences, C1, bidi overrides…) is shown visibly."""

    return for_terminal(text) if sys.stdout.isatty() else text


class _Shown:
    """A reply shown on the terminal as it arrives, through the terminal sanitiser; a
    trailing newline is held back (the reply's own line ends when it is complete)."""

    def __init__(self) -> None:
        self.text = ""  # every piece shown (raw)
        self._held = ""

    def __call__(self, piece: str) -> None:
        self.text += piece
        piece, self._held = self._held + piece, ""
        if piece.endswith("\n"):
            piece, self._held = piece[:-1], "\n"
        sys.stdout.write(_reply_text(piece))
        sys.stdout.flush()

    def finish(self, result: str | None) -> None:
        """After the write: the part of the reply not shown yet, and the line's end."""
        rest = result or ""
        rest = rest[len(self.text) :] if rest.startswith(self.text) else ""
        sys.stdout.write(_reply_text(rest) + "\n" if result is not None or self.text else "")
        sys.stdout.flush()


def _reader_gone() -> bool:
    """Whether nobody reads stdout any more, asked before a batch line's agent is called.

    On a pipe it first waits until the reader has taken every outcome written so far,
    or has gone: a reader that stops after some line (`head -1`) and is still exiting
    must not have the next request run and charged with nobody to read its outcome."""
    try:
        fd = sys.stdout.fileno()
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    pause = 0.0001
    while True:
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return True
        if not pipe or _unread_bytes(fd) == 0:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _unread_bytes(fd: int) -> int:
    """How many bytes written to the pipe `fd` its reader has not taken (0 when the
    system cannot say)."""
    try:
        held = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", held)[0])


def _emit_line(doc: dict[str, Any]) -> None:
    """One NDJSON outcome on stdout, flushed; a failed write is WriteFailed."""

    try:
        sys.stdout.write(escape_json_text(json_text(doc, compact=True)) + "\n")
        sys.stdout.flush()
    except StdoutClosed:
        raise WriteFailed("the reader of stdout went away") from None
    except OSError as error:
        raise WriteFailed(f"cannot write to standard output: {error.strerror}") from None


@app.command("request")
def request(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument(),
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
    no_stream: bool = typer.Option(
        False,
        "--no-stream",
        help="On a terminal, wait for the whole reply instead of showing it as it comes.",
    ),
    as_json: bool = json_option(
        "Print the outcome as JSON: every recorded outcome (complete, rejected, failed), "
        'whatever the exit code; an error that records nothing prints {"error": {...}}.'
    ),
    macaroon: str | None = MACAROON_OPTION,
    macaroon_file: str | None = MACAROON_FILE_OPTION,
) -> None:
    """Run a request on a session: the reply on stdout; exit 0, 5 (rejected) or 6 (failed)."""

    pricing, limits = Pricing.from_env(), RequestLimits.from_env()
    chosen = agent_from_spec(
        agent,
        model=model,
        timeout=limits.agent_timeout_seconds,
        max_reply_chars=limits.max_reply_chars,
    )
    reads_stdin = batch or message in (None, "-")
    if reads_stdin and "-" in (macaroon, macaroon_file):
        raise BadInput("stdin cannot carry both the macaroon and the request")
    with ended_by_signals():  # the lease given back, an exec agent's processes ended
        if batch:
            if message is not None or idempotency_key is not None:
                raise BadInput(
                    "--batch reads messages and keys from stdin; give neither on the line"
                )
            conn, sid = authorized_session(ctx, session_id, macaroon, macaroon_file, "request")
            lines = bounds.BoundedLines(stdin_bytes(), limits.batch_line_bytes)
            with progress("answering requests", stdout_free=True) as shown:
                answered = 0

                def emit(outcome: dict[str, object]) -> None:
                    nonlocal answered
                    _emit_line(outcome)
                    answered += 1
                    if shown is not None:
                        shown(answered, None)

                batches.run_batch(
                    conn,
                    sid,
                    lines,
                    chosen,
                    emit,
                    reader_gone=_reader_gone,
                    pricing=pricing,
                    limits=limits,
                )
            return
        text = (
            message
            if message not in (None, "-")
            else request_rules.read_message(stdin_bytes(), limits)
        )
        assert text is not None
        request_rules.validate_message(text, limits)
        request_rules.validate_idempotency_key(idempotency_key)
        conn, sid = authorized_session(ctx, session_id, macaroon, macaroon_file, "request")
        live = _Shown() if not (as_json or no_stream) and sys.stdout.isatty() else None
        try:
            outcome = session_requests.run_request(
                conn,
                sid,
                text,
                chosen,
                idempotency_key=idempotency_key,
                pricing=pricing,
                limits=limits,
                on_text=live,
            )
        except NotServed as refused:  # not recorded (paused, expired, busy...): say so in JSON too
            if live is not None and live.text:
                live.finish(None)
            if as_json:
                print_json(session_requests.unrecorded_refusal(sid, str(refused)))
            raise
        except Exception:
            if live is not None and live.text:
                live.finish(None)  # the line shown so far ends; the error follows on stderr
            raise
        if as_json:
            print_json(outcome.as_json())
        elif live is not None:
            live.finish(outcome.result if outcome.state == "complete" else None)
        elif outcome.state == "complete":
            sys.stdout.write(_reply_text(outcome.result or "") + "\n")
        if outcome.state == "rejected":
            raise NotServed(f"request rejected: {outcome.reason}")
        if outcome.state == "failed":
            raise AgentFailed(f"agent failed: {outcome.error_message}")
