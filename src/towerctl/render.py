"""Turning values into text: JSON for scripts, tables for people.

Nothing here touches the database; everything writes to a text stream given by
the caller, so tests can render into `io.StringIO`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any
from uuid import UUID


def iso(value: datetime | None) -> str | None:
    """UTC ISO 8601 with a `Z`, millisecond precision."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def json_text(value: Any, *, compact: bool = False) -> str:
    if compact:
        return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(value, default=_default, ensure_ascii=False, indent=2)


def write_json(value: Any, out: IO[str], *, compact: bool = False) -> None:
    out.write(json_text(value, compact=compact))
    out.write("\n")


def write_key_values(rows: Mapping[str, Any], out: IO[str]) -> None:
    """`key: value` lines for a single record shown to a person."""
    width = max((len(k) for k in rows), default=0)
    for key, value in rows.items():
        if isinstance(value, datetime):
            value = iso(value)
        shown = "-" if value is None else value
        out.write(f"{key.ljust(width)}  {shown}\n")
