"""Following a live session (`session messages --follow`): the selection, then every
new message as it commits, in id order, none missed and none repeated.

Wake-ups. Migration 0009 adds a trigger that notifies the channel
`towerctl_session_<session id hex>` when messages of that session are inserted.
The follower LISTENs on a connection of its own and, after each notification *and*
at least every `Timing.poll` seconds, reads what is new by id. A notification only
says "look now": losing one (or never getting any, as behind a transaction-pooling
PgBouncer, where LISTEN does not survive) delays a message by at most one poll and
never loses it.

Id order is not commit order. Ids come from a sequence when a row is inserted; a
transaction that took id 41 may commit after one that took id 42. A reader that
printed 42 and moved its cursor past it would never print 41. So the follower
moves its cursor only to a *settled horizon*: it reads how far the sequence has
handed out ids (`pg_sequence_last_value`, H), then which transactions hold the
sequence's lock (every `nextval` takes RowExclusiveLock on the sequence until its
transaction ends, so any transaction that took an id <= H and has not finished is
among them), and waits until every one of those has ended. From then on no id <= H
can appear any more: everything of the session up to H is read and printed, and
the cursor becomes H. Transactions that start later take ids above H. The wait is
as long as the writes in flight (one statement for a request); a transaction left
open after taking an id holds the live part back (it is never skipped). This
relies on the sequence handing out ids one at a time (`CACHE 1`, the identity
default); a cached sequence would need a different horizon.

The initial page is read the same way (everything of the selection up to the
first horizon), so requests that commit while it is written come in the live part.

Checks. Every `Timing.recheck` seconds the macaroon is checked again (a revoked or
expired token raises Unauthorized: exit 3) and the session's state is read: once
it is expired, the follower prints what is left and ends normally. A reader that
went away (a closed pipe) ends the follow quietly, found at the next round even
when nothing is written. A lost server surfaces as psycopg's OperationalError (the
CLI maps it to exit 8).
"""

from __future__ import annotations

import select
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
from psycopg import sql

from towerctl import auth, db, render, sessions, transcripts
from towerctl.errors import BadInput
from towerctl.transcripts import MESSAGE_JSON, REQUEST_STATE, Format, Message, Selection
from towerctl.transcripts.export import BinaryOut, Blocks, Options, TextStream

if TYPE_CHECKING:
    from towerctl.auth.keys import KeyRing

FORMATS = (Format.ndjson, Format.table)
CHANNEL_PREFIX = "towerctl_session_"
SEQUENCE = "pg_get_serial_sequence('session_messages', 'id')::regclass"
HANDED_OUT = f"SELECT coalesce(pg_sequence_last_value({SEQUENCE}), 0)"
WRITERS = f"""
SELECT coalesce(array_agg(DISTINCT virtualtransaction), '{{}}')
FROM pg_locks
WHERE locktype = 'relation' AND relation = {SEQUENCE}
  AND mode = 'RowExclusiveLock' AND pid IS DISTINCT FROM pg_backend_pid()"""
STILL_RUNNING = """
SELECT coalesce(array_agg(virtualxid), '{}') FROM pg_locks
WHERE locktype = 'virtualxid' AND virtualxid = ANY(%s::text[])"""
RANGE = """
FROM session_messages
WHERE session_id = %(sid)s AND id > %(from)s AND id <= %(to)s
  AND (%(role)s::text IS NULL OR role = %(role)s)"""
TAIL_START = f"SELECT min(id) FROM (SELECT id {RANGE} ORDER BY id DESC LIMIT %(last)s) t"
NDJSON_ROWS = f"SELECT id, {MESSAGE_JSON} {RANGE} ORDER BY id LIMIT %(chunk)s"
TABLE_ROWS = (
    f"SELECT id, role, left(content, {render.TABLE_CELL_CHARS}), session_request_id,"
    f" created_at, length(content), {REQUEST_STATE} {RANGE} ORDER BY id LIMIT %(chunk)s"
)


def channel(session_id: UUID) -> str:
    """The notification channel of one session (as the trigger of migration 0009 names it)."""
    return CHANNEL_PREFIX + session_id.hex


@dataclass(frozen=True)
class Timing:
    poll: float = 1.0  # read what is new at least this often, notification or not
    recheck: float = 5.0  # check the macaroon and the session's expiry this often
    settle: float = 0.01  # between two looks at the writes in flight
    final: float = 10.0  # at most this long for the writes in flight when the session ends


@dataclass(frozen=True)
class Followed:
    messages: int
    reason: str  # "expired", "interrupted", "reader gone"


@dataclass(frozen=True)
class Access:
    """What lets the follow go on: the macaroon (scope read) and a session not yet expired."""

    ring: KeyRing
    token: str | None
    session_id: UUID

    def still_live(self, conn: psycopg.Connection) -> bool:
        """False once the session is expired; raises Unauthorized (exit 3) once the token
        no longer authorises (revoked, expired)."""
        auth.authorize(conn, self.ring, self.token, session_id=str(self.session_id), scope="read")
        return sessions.get_session(conn, self.session_id).state != "expired"


def check_follow(selection: Selection, fmt: Format) -> None:
    """What `--follow` cannot do (exit 2)."""
    if fmt not in FORMATS:
        raise BadInput("--follow works with --format ndjson or table")
    if selection.before is not None:
        raise BadInput("--follow cannot be used with --before (new messages come after it)")
    if selection.limit is not None:
        raise BadInput("--follow cannot be used with --limit (use --last N to start near the end)")


class Horizon:
    """How far ids are settled: no transaction can still commit an id at or below it."""

    def __init__(self, conn: psycopg.Connection, settle: float) -> None:
        self.conn, self.settle = conn, settle
        self.mark: tuple[int, list[str]] | None = None

    def settled(self, wait: float) -> int | None:
        """The next settled horizon, waiting up to `wait` seconds for the writes in flight;
        None when they are still running (the same mark is waited on next time)."""
        if self.mark is None:
            handed = self._value(HANDED_OUT, ())
            self.mark = (int(handed), list(self._value(WRITERS, ())))
        handed, writers = self.mark
        deadline = time.monotonic() + wait
        while writers:
            writers = list(self._value(STILL_RUNNING, (writers,)))
            if not writers:
                break
            if time.monotonic() >= deadline:
                self.mark = (handed, writers)
                return None
            time.sleep(self.settle)
        self.mark = None
        return handed

    def _value(self, query: str, params: tuple[Any, ...]) -> Any:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


class Printer:
    """Writes messages of one id range after another in the chosen format, flushed."""

    def __init__(self, conn: psycopg.Connection, selection: Selection, options: Options,
                 out: BinaryOut) -> None:  # fmt: skip
        self.conn, self.selection, self.options = conn, selection, options
        self.sink = Blocks.for_format(out, options)
        self.header = True
        self.printed = 0

    def params(self, start: int, end: int) -> dict[str, Any]:
        return {"sid": self.selection.session_id, "from": start, "to": end,
                "role": self.selection.role, "chunk": transcripts.CHUNK_ROWS}  # fmt: skip

    def tail_start(self, start: int, end: int, last: int) -> int:
        """The cursor from which `last` messages of the range remain."""
        row = self.conn.execute(TAIL_START, self.params(start, end) | {"last": last}).fetchone()
        first = row[0] if row else None
        return start if first is None else int(first) - 1

    def print_range(self, start: int, end: int) -> None:
        """Every message with start < id <= end, in id order, in chunks."""
        while start < end:
            last = self._chunk(start, end)
            if last is None:
                break
            start = last
        if self.header and self.options.fmt is Format.table:
            self._table([])  # the header, even before the first message
        self.sink.flush()

    def _chunk(self, start: int, end: int) -> int | None:
        params = self.params(start, end)
        if self.options.fmt is Format.ndjson:
            rows = self.conn.execute(NDJSON_ROWS, params).fetchall()
            for _, line in rows:
                self.sink.add(line.encode("utf-8") + b"\n")
        else:
            rows = self.conn.execute(TABLE_ROWS, params).fetchall()
            self._table([Message(*row) for row in rows])
        if not rows:
            return None
        self.printed += len(rows)
        self.sink.flush()
        return int(rows[-1][0])

    def _table(self, messages: list[Message]) -> None:
        if not messages and not self.header:
            return
        render.write_transcript_table(
            messages, TextStream(self.sink), color=self.options.color,
            width=self.options.width, header=self.header,
        )  # fmt: skip
        self.header = False


def follow(
    conn: psycopg.Connection,
    listen_url: str,
    access: Access,
    selection: Selection,
    options: Options,
    out: BinaryOut,
    *,
    timing: Timing | None = None,
) -> Followed:
    """Print the selection, then each new message as it commits, until the session
    expires, the reader goes away, or KeyboardInterrupt (SIGINT, or SIGTERM made one
    by the caller), which all end it normally; a token that stops authorising raises
    Unauthorized. `conn` (the primary, the caller's) does the reads and checks; the
    follow opens its own connection to `listen_url` for LISTEN and closes it."""
    timing = timing or Timing()
    check_follow(selection, options.fmt)
    with ExitStack() as stack:
        listener = stack.enter_context(
            closing(db.connect(listen_url, application_name="towerctl-follow"))
        )
        name = sql.Identifier(channel(selection.session_id))
        listener.execute(sql.SQL("LISTEN {}").format(name))
        return _follow(conn, listener, access, selection, options, out, timing)
    raise AssertionError("unreachable")


def _follow(
    conn: psycopg.Connection,
    listener: psycopg.Connection,
    access: Access,
    selection: Selection,
    options: Options,
    out: BinaryOut,
    timing: Timing,
) -> Followed:
    printer = Printer(conn, selection, options, out)
    horizon = Horizon(conn, timing.settle)
    try:
        end = _wait_settled(horizon, timing.poll)
        cursor = selection.after or 0
        if selection.last is not None:
            cursor = printer.tail_start(cursor, end, selection.last)
        printer.print_range(cursor, end)
        cursor = end
        checked = time.monotonic()
        while True:
            if _reader_gone(out):
                return Followed(printer.printed, "reader gone")
            if time.monotonic() - checked >= timing.recheck:
                checked = time.monotonic()
                if not access.still_live(conn):
                    settled = horizon.settled(timing.final)
                    if settled is not None:
                        printer.print_range(cursor, settled)
                    return Followed(printer.printed, "expired")
            for _ in listener.notifies(timeout=timing.poll, stop_after=1):
                pass
            settled = horizon.settled(timing.poll)
            if settled is not None and settled > cursor:
                printer.print_range(cursor, settled)
                cursor = settled
    except KeyboardInterrupt:
        return Followed(printer.printed, "interrupted")


def _wait_settled(horizon: Horizon, step: float) -> int:
    while True:
        settled = horizon.settled(step)
        if settled is not None:
            return settled


def _reader_gone(out: BinaryOut) -> bool:
    """True when `out` is a pipe or socket whose reader has gone (POLLERR / POLLHUP)."""
    fileno = getattr(out, "fileno", None)
    if fileno is None:
        return False
    try:
        fd = fileno()
        poller = select.poll()
        poller.register(fd, 0)  # errors and hang-ups are always reported
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, mask in events)
