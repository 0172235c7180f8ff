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
