"""Exporting a transcript: one operation that owns everything it opens.

`export(conn, selection, options, out)` opens a REPEATABLE READ, read-only
snapshot, its COPY (json, ndjson, csv) or named cursor (table, markdown), streams
the selection into `out` (any object with `write(bytes)`), and closes them in
reverse order on every way out:

- success: the COPY or cursor ends, the snapshot commits;
- anything else (the writer fails, the reader is gone, KeyboardInterrupt or a
  signal turned into an exception, the server is lost): the connection is closed
  *first*, which abandons the COPY at once (no waiting for the rest of its data)
  and ends the snapshot on the server, then the COPY, cursor and transaction
  objects unwind on the closed connection without touching the network. The
  connection must therefore be private to the export; nothing is ever left idle
  in transaction.

Errors from `out.write` propagate unchanged: mapping them to exit codes (a reader
gone, a full disk) is the caller's business.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg import Copy

from towerctl import render, transcripts
from towerctl.sanitize import escape_json_bytes, for_terminal
from towerctl.transcripts import Format, Message, Selection

BLOCK_BYTES = 1 << 16  # written to `out` in blocks of about this size
PROGRESS_EVERY = 5_000  # messages between two progress reports
COPY_FORMATS = (Format.json, Format.ndjson, Format.csv)

# (messages written so far, messages in the selection)
Progress = Callable[[int, int], None]


class BinaryOut(Protocol):
    def write(self, data: bytes, /) -> object: ...


@dataclass(frozen=True)
class Options:
    """How to write: the format, and what the destination is.

    `raw`: CSV keeps formula cells as they are. `visible`: the destination is a
    terminal, so every hidden character is shown (`\\x1b`) whatever the format.
    `color` and `width` are for the table.
    """

    fmt: Format
    raw: bool = False
    visible: bool = False
    color: bool = False
    width: int = 100


@dataclass(frozen=True)
class Exported:
    messages: int
    next_cursor: int | None


def export(
    conn: psycopg.Connection,
    selection: Selection,
    options: Options,
    out: BinaryOut,
    *,
    progress: Progress | None = None,
) -> Exported:
    """Write the selection to `out` from one snapshot; returns how many messages and the
    page's next cursor. On any failure the connection is closed (see the module text)."""
    with ExitStack() as stack:
        stack.enter_context(_snapshot(conn))
        stack.enter_context(_abandon_on_error(conn))
        selection = transcripts.tail(conn, selection)
        cursor = transcripts.next_cursor(conn, selection)
        total = transcripts.count(conn, selection) if progress is not None else 0
        counter = _Counter(progress, total)
        sink = Blocks.for_format(out, options)
        if options.fmt in COPY_FORMATS:
            query = transcripts.copy_query(selection, options.fmt, raw=options.raw)
            copy = stack.enter_context(stack.enter_context(conn.cursor()).copy(query))
            stack.enter_context(_abandon_on_error(conn))  # runs before the COPY's own exit
            written = _write_copy(
                copy, options.fmt, str(selection.session_id), cursor, sink, counter
            )
        else:
            rows = stack.enter_context(conn.cursor(name="transcript"))
            stack.enter_context(_abandon_on_error(conn))
            rows.itersize = transcripts.CHUNK_ROWS
            cell = render.TABLE_CELL_CHARS if options.fmt is Format.table else None
            rows.execute(transcripts.rows_query(cell), selection.params())
            messages = stack.enter_context(closing(_messages(rows, counter)))
            text = TextStream(sink)
            if options.fmt is Format.markdown:
                written = render.write_transcript_markdown(
                    str(selection.session_id), messages, text, cursor
                )
            else:
                written = render.write_transcript_table(
                    messages, text, color=options.color, width=options.width
                )
        sink.flush()
    return Exported(written, cursor)


@contextmanager
def _snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """One REPEATABLE READ, read-only transaction: the page, its cursor and its count agree."""
    saved = (conn.isolation_level, conn.read_only)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        with conn.transaction():
            yield
    finally:
        if not conn.closed:
            conn.isolation_level, conn.read_only = saved


@contextmanager
def _abandon_on_error(conn: psycopg.Connection) -> Iterator[None]:
    """On any exception, close the connection before anything else unwinds.

    Closing is the one way to drop a COPY at once: psycopg's own exit would cancel
    and then read the rest of the stream, and a lost server or a second signal
    could leave it waiting. The server ends the snapshot when the socket closes.
    """
    try:
        yield
    except BaseException:
        conn.close()
        raise


class _Counter:
    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress(0, total)

    def add(self) -> None:
        self.done += 1
        if self.progress is not None and self.done % PROGRESS_EVERY == 0:
            self.progress(self.done, self.total)


class Blocks:
    """Bytes gathered into blocks of whole rows, escaped, then written to `out`.

    JSON rows pass through `escape_json_bytes` (DEL, C1, bidi and zero-width
    characters as `\\uXXXX`; PostgreSQL's `to_json` escapes C0 already) one by one as
    they are added, so the rows of plain ASCII (most) are passed over in C and only
    the others are searched. With `visible` every block passes through `for_terminal`.
    """

    def __init__(self, out: BinaryOut, *, json_escape: bool, visible: bool) -> None:
        self.out, self.json_escape, self.visible = out, json_escape, visible
        self.buffer = bytearray()

    @classmethod
    def for_format(cls, out: BinaryOut, options: Options) -> Blocks:
        """The sink for one format. Only bytes that come straight from the database (the
        COPY formats) are sanitised here, as whole blocks: the table and Markdown are
        sanitised cell by cell by `render`, and their own escape codes (rich's colours)
        must reach the terminal as they are, or it shows them as text."""
        return cls(
            out,
            json_escape=options.fmt in (Format.json, Format.ndjson),
            visible=options.visible and options.fmt in COPY_FORMATS,
        )

    def add(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += escape_json_bytes(bytes(data)) if self.json_escape else data
        if len(self.buffer) >= BLOCK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        block = bytes(self.buffer)
        self.buffer.clear()
        if self.visible:
            block = for_terminal(block.decode("utf-8", "replace")).encode("utf-8")
        self.out.write(block)


class TextStream:
    """A text stream over `Blocks` for the renderers (rich wants `write` and `flush`)."""

    def __init__(self, sink: Blocks) -> None:
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.add(text.encode("utf-8"))
        return len(text)

    def flush(self) -> None:
        """Blocks are written when full or when the export ends."""


def _write_copy(
    copy: Copy,
    fmt: Format,
    session_id: str,
    cursor: int | None,
    sink: Blocks,
    counter: _Counter,
) -> int:
    """COPY rows into the sink; one block of COPY data is one row. Returns messages."""
    rows = 0
    if fmt is Format.json:
        sink.add(b'{"sessionId": ' + json.dumps(session_id).encode() + b', "messages": [')
        for block in copy:
            sink.add(b",\n  " if rows else b"\n  ")
            sink.add(bytes(block).rstrip(b"\n"))
            rows += 1
            counter.add()
        sink.add(b"\n]" if rows else b"]")
        sink.add(b', "nextCursor": ' + json.dumps(cursor).encode() + b"}\n")
        return rows
    for block in copy:
        sink.add(block)
        rows += 1
        counter.add()
    return rows - 1 if fmt is Format.csv and rows else rows  # less the CSV header


def _messages(
    rows: psycopg.ServerCursor[tuple[object, ...]], counter: _Counter
) -> Generator[Message, None, None]:
    for row in rows:
        yield Message(*row)  # type: ignore[arg-type]
        counter.add()
