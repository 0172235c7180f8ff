"""Turning values into text: JSON for scripts, tables for people.

Nothing here touches the database; everything writes to a text stream given by
the caller, so tests can render into `io.StringIO`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Protocol, cast
from uuid import UUID

from towerctl.sanitize import for_terminal


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
#
# The machine formats come from PostgreSQL's COPY (see `towerctl.transcripts.export`); the people
# formats are rendered here from `transcripts.Message` values.

TABLE_CELL_CHARS = 2_000  # content shown per table cell; the rest is one --format away


class TextOut(Protocol):
    """Where the people formats write: any text stream (`io.StringIO` in tests)."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...


def shown_text(content: str) -> str:
    """Message content for a person: Windows line ends made plain, every other hidden
    character (escape sequences, C1, DEL, bidi, zero-width, lone CR) shown visibly."""
    return for_terminal(content.replace("\r\n", "\n"))


def cut_marker(more: int) -> str:
    return f"… [cut: {more:,} more characters; use --format json]"


# Characters that mean something anywhere in a Markdown line (emphasis, code, links,
# HTML, entities, tables, strikethrough, maths), backslash-escaped wherever they are.
_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>&|~$])")
_MARKDOWN_ORDERED = re.compile(r"^(\d{1,9})([.)])")
_ASCII_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def markdown_text_line(line: str) -> str:
    """One line of content as literal Markdown text: it can open no heading (ATX or
    setext), fence, code block, list, quote, table, HTML or link, whatever it holds."""
    body = line.lstrip(" \t")
    indent = "".join("&#32;" if c == " " else "&#9;" for c in line[: len(line) - len(body)])
    body = _MARKDOWN_INLINE.sub(r"\\\1", body)
    if body[:1] in _ASCII_PUNCTUATION and body[:1] != "\\":
        body = "\\" + body  # #, =, -, +, >, ... at the start of a line
    else:
        body = _MARKDOWN_ORDERED.sub(r"\1\\\2", body)  # "1. item" is no list
    return indent + body


def markdown_quote(content: str) -> str:
    """The content as a block quote of literal text (hidden characters shown)."""
    lines = shown_text(content).split("\n")
    return "\n".join(f"> {markdown_text_line(line)}" if line else ">" for line in lines)


def write_transcript_markdown(
    session_id: str, messages: Iterable[Any], out: TextOut, next_cursor: int | None = None
) -> int:
    """One heading per message, the content quoted: pastes cleanly into a ticket.

    Only towerctl writes headings; message text is escaped so that no content can
    forge one, open a fence or an HTML block (checked with a real parser in tests).
    """
    out.write(f"# Transcript of session {session_id}\n")
    count = 0
    for m in messages:
        marker = f" · request {m.request_state}" if m.not_an_answer else ""
        out.write(f"\n## #{m.id} · {m.role} · {iso(m.created_at)}{marker}\n\n")
        out.write(markdown_quote(m.content) + "\n")
        count += 1
    if count == 0:
        out.write("\n_No messages._\n")
    if next_cursor is not None:
        out.write(f"\n_More messages follow: `--after {next_cursor}`._\n")
    return count


def table_cell(content: str, cut: int) -> str:
    """A table cell: hidden characters shown, a visible marker where the text was cut."""
    shown = shown_text(content)
    return f"{shown}{cut_marker(cut)}" if cut else shown


def _console(out: Any, *, color: bool, width: int) -> Any:
    """A rich console writing to `out`: colour only when asked, no markup, emoji or
    highlighting of its own (the text is outside text, shown as it is)."""
    from rich.console import Console

    return Console(
        file=cast(IO[str], out),
        width=width,
        color_system="auto" if color else None,
        no_color=not color,
        highlight=False,
        emoji=False,
        markup=False,
        force_terminal=color,
    )


def write_transcript_table(
    messages: Iterable[Any],
    out: TextOut,
    *,
    color: bool,
    width: int,
    chunk: int = 500,
    header: bool = True,
) -> int:
    """A rich table, rendered in chunks with fixed columns so huge sessions stream.

    Messages arrive cut to `TABLE_CELL_CHARS` (in SQL); `m.cut` says how much was left out.
    Without `header` (the live part of `--follow`) only rows are written, and nothing
    at all when there are no messages.
    """
    from rich import box
    from rich.table import Table

    console = _console(out, color=color, width=width)
    role_style = {"user": "bold cyan", "assistant": "bold green"}

    def new_table(header: bool) -> Table:
        table = Table(
            box=box.SIMPLE_HEAD, show_header=header, show_edge=False, pad_edge=False, expand=True
        )
        table.add_column("id", justify="right", width=7, no_wrap=True)
        table.add_column("time (UTC)", width=24, no_wrap=True)
        table.add_column("role", width=10, no_wrap=True)
        table.add_column("content", ratio=1, overflow="fold")
        return table

    table, rows, count = new_table(header), 0, 0
    for m in messages:
        when = iso(m.created_at)
        style = role_style.get(m.role) if color else None
        role = m.role
        if m.not_an_answer:  # words, so that it shows without colour too
            role, style = f"{m.role}\n({m.request_state})", "bold red" if color else None
        table.add_row(str(m.id), when, role, table_cell(m.content, m.cut), style=style)
        rows += 1
        count += 1
        if rows >= chunk:
            console.print(table)
            table, rows = new_table(False), 0
    if rows or (count == 0 and header):
        console.print(table)
    return count


# --- reports: small tables of values, for people (aligned text) and for sheets (CSV) ---

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"-?[0-9][0-9,]*")


def _cell_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return iso(value) or "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return for_terminal(str(value))


def write_aligned(headers: list[str], rows: Iterable[list[Any]], out: TextOut) -> None:
    """A header line and one line per row, columns aligned (numbers to the right);
    text shown visibly (hidden characters escaped), so it is safe on a terminal."""
    cells = [[_cell_text(v) for v in row] for row in rows]
    columns = range(len(headers))
    widths = [max([len(headers[i]), *(len(r[i]) for r in cells)]) for i in columns]
    numeric = [
        bool(cells) and all(_NUMBER.fullmatch(r[i]) or r[i] == "-" for r in cells) for i in columns
    ]

    def line(values: list[str]) -> str:
        parts = [values[i].rjust(widths[i]) if numeric[i] else values[i].ljust(widths[i])
                 for i in columns]  # fmt: skip
        return "  ".join(parts).rstrip() + "\n"

    out.write(line(headers))
    for row in cells:
        out.write(line(row))


def csv_cell(value: Any) -> Any:
    """A CSV cell: times in ISO 8601; text a spreadsheet would run as a formula gets a '."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(headers: list[str], rows: Iterable[list[Any]], out: TextOut) -> None:
    writer = csv.writer(cast(IO[str], out), lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow([csv_cell(v) for v in row])


def write_bar_chart(bars: list[tuple[str, int]], out: TextOut, *, color: bool, width: int) -> None:
    """One horizontal bar per (label, value), scaled to the largest (rich, for a terminal)."""
    from rich import box
    from rich.bar import Bar
    from rich.table import Table

    console = _console(out, color=color, width=width)
    top = max((v for _, v in bars), default=0) or 1
    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False, expand=True)
    table.add_column("period", no_wrap=True)
    table.add_column("sats", justify="right", no_wrap=True)
    table.add_column("bar", ratio=1)
    for label, value in bars:
        table.add_row(for_terminal(label), f"{value:,}", Bar(top, 0, value, color="green"))
    console.print(table)


def write_search_matches(matches: Iterable[Any], out: TextOut, *, color: bool) -> None:
    """Each match: time, session, message id and role on one line, the snippet below,
    its hidden characters shown visibly; the matched words bold (in colour) or «marked»."""
    for m in matches:
        out.write(f"{iso(m.created_at)}  {m.session_id}  #{m.message_id}  {m.role}\n    ")
        for text, hit in m.parts():
            shown = for_terminal(text)
            if hit:
                shown = f"\x1b[1;33m{shown}\x1b[0m" if color else f"«{shown}»"
            out.write(shown)
        out.write("\n")


def write_session_rows(sessions: Iterable[Any], out: TextOut, *, activity: bool) -> None:
    """`session list` for people: a header, then one 85-column line per session."""
    when = "LAST ACTIVITY" if activity else "CREATED"
    out.write(f"{'ID':<36}  {'STATE':<16}  {'SATS':>11}  {when} (UTC)\n")
    for s in sessions:
        moment = s.last_activity_at if activity else s.created_at
        shown = moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        out.write(f"{s.id!s:<36}  {s.state:<16}  {s.balance_sats:>11,}  {shown}\n")
