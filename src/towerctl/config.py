"""Settings read from the environment, each in one place with its default.

Precedence for every setting: command-line flag (handled by the CLI), then the
environment variable named here, then the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from towerctl.errors import BadInput


def home() -> Path:
    """`TOWER_HOME`, or the platform's user data folder for towerctl."""
    explicit = os.environ.get("TOWER_HOME")
    if explicit:
        return Path(explicit).expanduser()
    import platformdirs

    return platformdirs.user_data_path("towerctl")


def database_url(flag: str | None) -> str | None:
    """The configured database, or None for the embedded default."""
    return flag or os.environ.get("TOWER_DATABASE_URL") or None


def macaroon_location() -> str:
    """The location written into macaroons and required of them (`TOWER_MACAROON_LOCATION`)."""
    return os.environ.get("TOWER_MACAROON_LOCATION") or "timmy-tower"


def _number(name: str, default: float, *, minimum: float = 0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum or value != value or value in (float("inf"), float("-inf")):
        raise BadInput(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _whole(name: str, default: int, *, minimum: int = 0) -> int:
    value = _number(name, default, minimum=minimum)
    if value != int(value):
        raise BadInput(f"{name} must be a whole number, got {os.environ.get(name)!r}")
    return int(value)


@dataclass(frozen=True)
class Pricing:
    """The cost formula's parameters (SPEC 6)."""

    eval_fee_sats: int = 10
    sats_per_1k_tokens: float = 100.0
    margin: float = 1.4

    @classmethod
    def from_env(cls) -> Pricing:
        return cls(
            eval_fee_sats=_whole("TOWER_EVAL_FEE_SATS", 10),
            sats_per_1k_tokens=_number("TOWER_SATS_PER_1K_TOKENS", 100.0),
            margin=_number("TOWER_MARGIN", 1.4),
        )


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on a session request and its context window."""

    max_message_chars: int = 32_000
    context_messages: int = 8
    context_tokens: int = 4_000
    busy_wait_seconds: float = 30.0
    agent_timeout_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> RequestLimits:
        return cls(
            max_message_chars=_whole("TOWER_MAX_MESSAGE_CHARS", 32_000, minimum=1),
            context_messages=_whole("TOWER_CONTEXT_MESSAGES", 8),
            context_tokens=_whole("TOWER_CONTEXT_TOKENS", 4_000),
            busy_wait_seconds=_number("TOWER_BUSY_WAIT", 30.0),
            agent_timeout_seconds=_number("TOWER_AGENT_TIMEOUT", 60.0, minimum=0.001),
        )
