"""Points in time as operators type them: an ISO 8601 time, or a duration ago (`12h`, `7d`)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time

from towerctl.errors import BadInput
from towerctl.units import parse_duration

_DURATION_LIKE = re.compile(r"^[0-9]+[smhd]$")


def parse_moment(text: str, flag: str, now: datetime | None = None) -> datetime:
    """`2026-12-07T10:00Z`, `2026-12-07` (midnight UTC), or `90s`/`15m`/`12h`/`1d` ago.
    A time without a zone is UTC."""
    cleaned = text.strip()
    if _DURATION_LIKE.match(cleaned):
        return (now or datetime.now(UTC)) - parse_duration(cleaned, flag)
    try:
        if len(cleaned) == 10:
            moment = datetime.combine(date.fromisoformat(cleaned), time(), UTC)
        else:
            moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise BadInput(
            f"{flag} must be an ISO time (2026-12-07T10:00Z) or a duration ago (12h, 1d)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
