"""Turning values into text: JSON for scripts, tables for people.

Nothing here touches the database; everything writes to a text stream given by
the caller, so tests can render into `io.StringIO`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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


# --- transcripts -------------------------------------------------------------------


def write_json_lines(rows: Iterable[bytes], out: IO[bytes], *, flush_bytes: int = 1 << 16) -> int:
    """Lines as they come (NDJSON or CSV from COPY), written in large blocks; returns rows."""
    buffer = bytearray()
    count = 0
    for row in rows:
        buffer += row
        count += 1
        if len(buffer) >= flush_bytes:
            out.write(buffer)
            buffer.clear()
    out.write(buffer)
    return count


def write_transcript_json(
    session_id: str,
    rows: Iterable[bytes],
    next_cursor: int | None,
    out: IO[bytes],
    *,
    flush_bytes: int = 1 << 16,
) -> int:
    """`{"sessionId", "messages": [...], "nextCursor"}`, the array written element by element."""
    out.write(b'{"sessionId": ' + json.dumps(session_id).encode() + b', "messages": [')
    buffer = bytearray()
    count = 0
    for row in rows:
        buffer += b",\n  " if count else b"\n  "
        buffer += row.rstrip(b"\n")
        count += 1
        if len(buffer) >= flush_bytes:
            out.write(buffer)
            buffer.clear()
    buffer += b"\n]" if count else b"]"
    out.write(buffer)
    out.write(b', "nextCursor": ' + json.dumps(next_cursor).encode() + b"}\n")
    return count


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def printable(text: str) -> str:
    """Text safe to show a person on a terminal: control characters (escape sequences
    included) are shown as `\\xNN`; newlines and tabs are kept."""
    return text.replace("\r\n", "\n").translate(_CONTROL)


def _quote_block(content: str) -> str:
    lines = printable(content).split("\n")
    return "\n".join(f"> {line}" if line else ">" for line in lines)


def write_transcript_markdown(
    session_id: str, messages: Iterable[Any], out: IO[str], next_cursor: int | None = None
) -> int:
    """One heading per message, the content quoted: pastes cleanly into a ticket."""
    out.write(f"# Transcript of session {session_id}\n")
    count = 0
    for m in messages:
        out.write(f"\n## #{m.id} · {m.role} · {iso(m.created_at)}\n\n")
        out.write(_quote_block(m.content) + "\n")
        count += 1
    if count == 0:
        out.write("\n_No messages._\n")
    if next_cursor is not None:
        out.write(f"\n_More messages follow: `--after {next_cursor}`._\n")
    return count


def write_transcript_table(
    messages: Iterable[Any], out: IO[str], *, color: bool, width: int, chunk: int = 500
) -> int:
    """A rich table, rendered in chunks with fixed columns so huge sessions stream."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(
        file=out,
        width=width,
        color_system="auto" if color else None,
        no_color=not color,
        highlight=False,
        emoji=False,
        markup=False,
        force_terminal=color,
    )
    role_style = {"user": "bold cyan", "assistant": "bold green"}

    def new_table(header: bool) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_header=header, pad_edge=False, expand=True)
        table.add_column("id", justify="right", width=7, no_wrap=True)
        table.add_column("time (UTC)", width=20, no_wrap=True)
        table.add_column("role", width=9, no_wrap=True)
        table.add_column("content", ratio=1, overflow="fold")
        return table

    table, rows, count = new_table(True), 0, 0
    for m in messages:
        when = m.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        style = role_style.get(m.role) if color else None
        table.add_row(str(m.id), when, m.role, printable(m.content), style=style)
        rows += 1
        count += 1
        if rows >= chunk:
            console.print(table)
            table, rows = new_table(False), 0
    if rows or count == 0:
        console.print(table)
    return count
