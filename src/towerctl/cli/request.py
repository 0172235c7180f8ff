"""`towerctl session request`: one request, or a batch of them from NDJSON."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING
from uuid import UUID

import typer

from towerctl.cli.session import (
    JSON_OPTION,
    MACAROON_FILE_OPTION,
    MACAROON_OPTION,
    app,
    authorized_session,
)
from towerctl.cli.state import print_json

if TYPE_CHECKING:
    import psycopg

    from towerctl.agents import Agent
    from towerctl.config import Pricing, RequestLimits


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
        conn, sid = authorized_session(ctx, session_id, macaroon, macaroon_file, "request")
        _run_batch(conn, sid, chosen, pricing, limits)
        return
    text = message if message not in (None, "-") else _read_stdin_message()
    assert text is not None
    requests.validate_message(text, limits)
    requests.validate_idempotency_key(idempotency_key)
    conn, sid = authorized_session(ctx, session_id, macaroon, macaroon_file, "request")
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


def _batch_item(number: int, raw: bytes) -> tuple[str, str | None] | None:
    """(message, idempotency key) of one NDJSON line; None for a blank line."""
    import json

    from towerctl.errors import BadInput

    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadInput(f"line {number}: not valid UTF-8") from None
    if not line:
        return None
    try:
        item = json.loads(line)
    except ValueError:
        raise BadInput(f"line {number}: not valid JSON") from None
    if not isinstance(item, dict) or not isinstance(item.get("message"), str):
        raise BadInput(f'line {number}: expected an object with a "message" string')
    key = item.get("idempotencyKey")
    if key is not None and not isinstance(key, str):
        raise BadInput(f"line {number}: idempotencyKey must be a string")
    return item["message"], key


def _run_batch(
    conn: psycopg.Connection,
    sid: UUID,
    agent: Agent,
    pricing: Pricing,
    limits: RequestLimits,
) -> None:
    """One NDJSON result per input line, in order; exit with the largest code among the
    lines (2 for a malformed line, which stops the batch after the lines before it)."""
    from towerctl import requests
    from towerctl.errors import BadInput, ExitCode, NotServed, error_for
    from towerctl.render import json_text

    counts = {"complete": 0, "rejected": 0, "failed": 0}
    codes = {"complete": ExitCode.OK, "rejected": ExitCode.NOT_SERVED}
    worst = ExitCode.OK
    out = sys.stdout
    stream = getattr(sys.stdin, "buffer", None)
    lines = stream if stream is not None else (x.encode() for x in sys.stdin)
    for number, raw in enumerate(lines, start=1):
        try:
            item = _batch_item(number, raw)
            if item is None:
                continue
            try:
                outcome = requests.run_request(
                    conn,
                    sid,
                    item[0],
                    agent,
                    idempotency_key=item[1],
                    pricing=pricing,
                    limits=limits,
                )
                doc = outcome.as_json()
                state = outcome.state
            except NotServed as refused:  # not recorded: paused, expired, busy
                doc = requests.unrecorded_refusal(sid, str(refused))
                state = "rejected"
        except BadInput as error:
            message = str(error) if str(error).startswith("line ") else f"line {number}: {error}"
            summary = ", ".join(f"{n} {s}" for s, n in counts.items())
            raise error_for(
                max(worst, ExitCode.BAD_INPUT), f"{message} (stopped; before it: {summary})"
            ) from None
        out.write(json_text(doc, compact=True) + "\n")
        out.flush()
        counts[state] += 1
        worst = max(worst, codes.get(state, ExitCode.AGENT_FAILED))
    if worst != ExitCode.OK:
        summary = ", ".join(f"{n} {s}" for s, n in counts.items())
        raise error_for(worst, f"batch: {summary}")
