"""What every agent shares: the conversation, the reply, the protocol, echo."""

from __future__ import annotations

import os
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


class Agent(Protocol):
    @property
    def name(self) -> str: ...

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply: ...


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

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply:
        return AgentReply("complete", conversation[-1].content)
