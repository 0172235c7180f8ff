"""What every agent shares: the conversation, the reply, the protocol, echo."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from towerctl import bounds

SECRET_ENVIRONMENT = ("OPENAI_API_KEY", "PGPASSWORD", "PGPASSFILE")
DECLINE_EXIT_STATUS = 10  # an exec agent that exits 10 declines; stdout is the reason
ERROR_TAIL_CHARS = bounds.AGENT_ERROR_CHARS


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class AgentReply:
    state: str  # complete | rejected | failed
    text: str  # the result, the reason, or the error message
    input_tokens: int | None = None  # as reported by the agent, when it reports usage
    output_tokens: int | None = None
    truncated: bool = False  # cut at the budget (by towerctl, or the agent said so)


# Where a streamed reply's text goes as it arrives (None: nobody watches; wait).
TextSink = Callable[[str], None]


class Agent(Protocol):
    @property
    def name(self) -> str: ...

    def answer(
        self,
        session_id: str,
        conversation: list[ChatMessage],
        max_output_tokens: int | None = None,
        on_text: TextSink | None = None,
    ) -> AgentReply:
        """The reply; `max_output_tokens`: the budget (SPEC 6), told to the agent;
        `on_text`: called with each piece of a complete reply's text as it arrives."""
        ...


def agent_environment() -> dict[str, str]:
    """The environment for an exec agent: towerctl's own settings and secrets removed
    (root key, macaroon, database URL, API keys)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TOWER_") and key not in SECRET_ENVIRONMENT
    }


def clean(text: str) -> str:
    """Agent text PostgreSQL can store: NUL and unpaired surrogates become U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _tail(text: str) -> str:
    text = text.strip()
    return text[-ERROR_TAIL_CHARS:] if text else ""


@dataclass(frozen=True)
class EchoAgent:
    """Offline and deterministic: the result is the user's message."""

    name: str = "echo"

    def answer(
        self,
        session_id: str,
        conversation: list[ChatMessage],
        max_output_tokens: int | None = None,
        on_text: TextSink | None = None,
    ) -> AgentReply:
        text = conversation[-1].content
        if max_output_tokens is not None and math.ceil(len(text) / 4) > max_output_tokens:
            return AgentReply("complete", text[: max_output_tokens * 4], truncated=True)
        return AgentReply("complete", text)
