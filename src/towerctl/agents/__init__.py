"""Agents that answer a session request: `echo`, `exec:COMMAND`, `openai:BASE_URL`.

An agent gets the conversation (context window plus the new user message) and
returns a reply: `complete` with a result, `rejected` with a reason (the agent
declined), or `failed` with an error message. Agents never raise for their own
failures; a misconfigured agent spec is refused before anything is written.
"""

from __future__ import annotations

import os
import shlex
import shutil

from towerctl import bounds
from towerctl.agents.base import (
    DECLINE_EXIT_STATUS,
    SECRET_ENVIRONMENT,
    Agent,
    AgentReply,
    ChatMessage,
    EchoAgent,
    TextSink,
    agent_environment,
    clean,
)
from towerctl.agents.exec_agent import ExecAgent
from towerctl.errors import BadInput

__all__ = [
    "DECLINE_EXIT_STATUS",
    "SECRET_ENVIRONMENT",
    "Agent",
    "AgentReply",
    "ChatMessage",
    "EchoAgent",
    "TextSink",
    "agent_environment",
    "agent_from_spec",
    "clean",
]


def agent_from_spec(
    spec: str | None,
    *,
    model: str | None = None,
    timeout: float = bounds.AGENT_SECONDS.default,
    max_reply_chars: int = int(bounds.REPLY_CHARS.default),
) -> Agent:
    """Build the agent named by `--agent` / TOWER_AGENT (default `echo`)."""
    spec = (spec or os.environ.get("TOWER_AGENT") or "echo").strip()
    if spec == "echo":
        return EchoAgent()
    if spec.startswith("exec:"):
        try:
            argv = tuple(shlex.split(spec[5:]))
        except ValueError as error:
            raise BadInput(f"--agent exec: cannot parse the command ({error})") from None
        if not argv:
            raise BadInput("--agent exec: needs a command, e.g. exec:./my-agent --flag")
        if shutil.which(argv[0]) is None:
            raise BadInput(f"--agent exec: program not found or not executable: {argv[0]}")
        return ExecAgent(argv, timeout, bounds.reply_output_bytes(max_reply_chars))
    if spec.startswith("openai:"):
        from towerctl.agents.openai_agent import OpenAIAgent, valid_base_url  # httpx: on use

        base_url = spec[7:].strip()
        if not valid_base_url(base_url):
            raise BadInput("--agent openai: needs a base URL, e.g. openai:https://api.example/v1")
        return OpenAIAgent(
            base_url=base_url,
            model=model or os.environ.get("TOWER_OPENAI_MODEL") or "gpt-4o-mini",
            api_key=os.environ.get("TOWER_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            timeout=timeout,
            max_body_bytes=bounds.http_body_bytes(max_reply_chars),
            max_reply_chars=max_reply_chars,
        )
    raise BadInput(f"unknown agent {spec.split(':')[0]!r}: use echo, exec:COMMAND or openai:URL")
