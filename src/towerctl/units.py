"""Parsing the units operators type: sats, durations, session ids."""

from __future__ import annotations

import re
from datetime import timedelta
from uuid import UUID

from towerctl.errors import BadInput

MAX_SATS = 100_000_000  # one bitcoin: the largest single deposit or top-up
MAX_DURATION = timedelta(days=366)
_DURATION = re.compile(r"^([1-9][0-9]{0,6})(s|m|h|d)$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_sats(value: int, flag: str) -> int:
    if not 1 <= value <= MAX_SATS:
        raise BadInput(f"{flag} must be a whole number of sats from 1 to {MAX_SATS:,}, got {value}")
    return value


def parse_duration(text: str, flag: str = "--ttl") -> timedelta:
    """`90s`, `15m`, `24h`, `7d`; at most 366 days."""
    match = _DURATION.match(text.strip())
    if not match:
        raise BadInput(f"{flag} must look like 90s, 15m, 24h or 7d, got {text!r}")
    duration = timedelta(seconds=int(match.group(1)) * _SECONDS[match.group(2)])
    if duration > MAX_DURATION:
        raise BadInput(f"{flag} may be at most 366d")
    return duration


def parse_session_id(text: str) -> UUID:
    try:
        value = UUID(text.strip())
    except (ValueError, AttributeError):
        raise BadInput(f"not a session id (a UUID): {text[:60]!r}") from None
    return value
