"""What `doctor` has already checked: watermarks kept in the store (SPEC 16).

A watermark says "every row of this table with an id up to N (sessions: opened up to
T) was seen by a clean run". An incremental run checks the sessions that have a row
past a watermark, every row of each, so a new request is checked with its session's
whole ledger and history.

Ids are not handed out in commit order: a transaction can take id 10, another take 11
and commit, and the first commit later. So a run does not advance a watermark to what
it saw, but to what it knew at its start: the highest ids (and the time) read first,
then the run waits until every transaction that held a transaction id then has ended
(`pg_snapshot_xmin` has passed that moment's `pg_snapshot_xmax`) before it takes the
snapshot it checks in. Every row under the new watermark is then in that snapshot, or
was rolled back. If a transaction stays open longer than the wait, the watermarks stay
where they were, and the next run checks that span again.

Purges and cleared histories only delete messages, and record it (with a new or an
updated history-clears row); the watermarks never move back, so a deleted row with
the highest id makes a run check a little more, never less.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

# Tables read by id; sessions are read by created_at (a uuid key has no order).
ID_SOURCES = ("session_requests", "session_messages", "balance_ledger", "session_history_clears")
SESSIONS = "sessions"
WAIT_SECONDS = 2.0  # for the transactions in flight at a run's start
FULL_ABOVE = 100_000  # more changed sessions than this: check them all in one pass

READ = "SELECT source, checked_id, checked_at FROM doctor_watermarks"

# The highest ids and the time a run starts from, read above the stored watermarks (the
# id indexes are BRIN: they find the newest rows, not a maximum). A session's created_at
# is its transaction's start, so the time is that of the oldest transaction we can see.
START = f"""
SELECT {", ".join(f"(SELECT max(id) FROM {t} WHERE id > %({t})s)" for t in ID_SOURCES)},
       least(now(), (SELECT min(xact_start) FROM pg_stat_activity
                   WHERE datname = current_database())),
       pg_snapshot_xmax(pg_current_snapshot())
"""
SETTLED = "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= %s::xid8"

CHANGED = """
SELECT session_id FROM session_requests WHERE id > %(session_requests)s
UNION SELECT session_id FROM session_messages WHERE id > %(session_messages)s
UNION SELECT session_id FROM balance_ledger WHERE id > %(balance_ledger)s
UNION SELECT session_id FROM session_history_clears WHERE id > %(session_history_clears)s
UNION SELECT id FROM sessions WHERE created_at > %(sessions)s
"""

RECORD = """
INSERT INTO doctor_watermarks AS w (source, checked_id, checked_at, full_run)
VALUES (%s, %s, %s, %s)
ON CONFLICT (source) DO UPDATE
SET checked_id = greatest(w.checked_id, excluded.checked_id),
    checked_at = greatest(w.checked_at, excluded.checked_at),
    recorded_at = excluded.recorded_at, full_run = excluded.full_run
"""


@dataclass(frozen=True)
class Marks:
    """Per table, the highest id checked (sessions: the latest created_at)."""

    ids: dict[str, int]
    created: datetime | None

    def params(self) -> dict[str, object]:
        floor = datetime.fromtimestamp(0).astimezone()
        return {**{t: self.ids.get(t, 0) for t in ID_SOURCES}, "sessions": self.created or floor}


@dataclass(frozen=True)
class Start:
    marks: Marks  # what the run may record once clean
    settled: bool  # every transaction in flight at the start has ended


def read(conn: psycopg.Connection) -> Marks | None:
    """The stored watermarks; None before the first clean run."""
    rows = conn.execute(READ).fetchall()
    if not rows:
        return None
    ids = {source: int(checked or 0) for source, checked, _ in rows if source in ID_SOURCES}
    created = next((at for source, _, at in rows if source == SESSIONS), None)
    return Marks(ids, created)


def start(conn: psycopg.Connection, stored: Marks | None, wait: float | None = None) -> Start:
    """Read the run's starting point, then wait for the transactions then in flight."""
    floors = {t: stored.ids.get(t, 0) if stored else 0 for t in ID_SOURCES}
    row = conn.execute(START, floors).fetchone()
    assert row is not None
    *highest, created, xmax = row
    ids = {t: int(v or floors[t]) for t, v in zip(ID_SOURCES, highest, strict=True)}
    marks = Marks(ids, created)
    wait = WAIT_SECONDS if wait is None else wait
    deadline = time.monotonic() + wait
    while True:
        settled_row = conn.execute(SETTLED, (str(xmax),)).fetchone()
        if settled_row and settled_row[0]:
            return Start(marks, True)
        if time.monotonic() >= deadline:
            return Start(marks, False)
        time.sleep(0.02)


def changed_sessions(conn: psycopg.Connection, marks: Marks) -> list[str]:
    """Sessions with a row past a watermark (new, or a session's newer requests)."""
    return [str(row[0]) for row in conn.execute(CHANGED, marks.params())]


def record(conn: psycopg.Connection, marks: Marks, *, full: bool) -> None:
    """After a clean run: advance the watermarks (never back)."""
    with conn.transaction():
        for source in ID_SOURCES:
            conn.execute(RECORD, (source, marks.ids.get(source, 0), None, full))
        conn.execute(RECORD, (SESSIONS, None, marks.created, full))
