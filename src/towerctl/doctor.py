"""`doctor`: every invariant of the store, checked with SQL.

Each check is a query that returns the rows at fault (empty = the invariant
holds). Run them all; report each with a short detail naming what is wrong.

A check names the session column it reads as `{scope[column]}`: a full run reads
every session (the condition is `TRUE`); an incremental run only the sessions
changed since the last clean run (`watermarks`), every row of each. A check
without one (the indexes) always reads everything.

A full run reads every row of the big tables, where a join per check costs a pass
over both tables each time. The checks of a request's messages share one pass
instead (`SUSPECTS`): it reads the messages index and the requests' primary key in
one order, merged, and returns every session where one of those checks could find a
row at fault (a superset). Each check then runs as in an incremental run, over those
sessions only, so what it reports is what its own query reports over every session.
The full forms of the other checks (`FULL_FORMS`) read each table once, hashed;
their hash tables may use `FULL_WORK_MEM` each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from towerctl import migrations, watermarks
from towerctl.db import first_line

SAMPLE = 5  # rows named in a failing check's detail
Row = tuple[Any, ...]
Settings = tuple[tuple[str, str], ...]  # (name, value) set for one statement

CHECKS: tuple[tuple[str, str, str], ...] = (
    (
        "balance_nonnegative",
        "every session's balance is >= 0",
        "SELECT id::text, balance_sats FROM sessions WHERE balance_sats < 0 AND {scope[id]}",
    ),
    (
        "balance_matches_ledger",
        "balance = deposits + top-ups - debits for every session",
        """
        SELECT s.id::text, s.balance_sats, coalesce(l.net, 0)
        FROM sessions s
        LEFT JOIN (
            SELECT session_id,
                   sum(CASE WHEN kind = 'debit' THEN -amount_sats ELSE amount_sats END) AS net
            FROM balance_ledger WHERE {scope[session_id]} GROUP BY session_id
        ) l ON l.session_id = s.id
        WHERE s.balance_sats <> coalesce(l.net, 0) AND {scope[s.id]}
        """,
    ),
    (
        "debits_match_requests",
        "every debit has its request, and each request's debit is in the ledger",
        """
        SELECT r.session_id::text, r.id, r.debited_sats, coalesce(l.amount_sats, 0)
        FROM session_requests r
        LEFT JOIN balance_ledger l
          ON l.session_id = r.session_id AND l.session_request_id = r.id AND l.kind = 'debit'
        WHERE r.debited_sats <> coalesce(l.amount_sats, 0) AND {scope[r.session_id]}
        UNION ALL
        SELECT l.session_id::text, l.session_request_id, NULL, l.amount_sats
        FROM balance_ledger l
        LEFT JOIN session_requests r
          ON r.session_id = l.session_id AND r.id = l.session_request_id
        WHERE l.kind = 'debit' AND r.id IS NULL AND {scope[l.session_id]}
        """,
    ),
    (
        "messages_have_requests",
        "every message points at a request of its session",
        """
        SELECT m.session_id::text, m.id
        FROM session_messages m
        LEFT JOIN session_requests r
          ON r.session_id = m.session_id AND r.id = m.session_request_id
        WHERE r.id IS NULL AND {scope[m.session_id]}
        """,
    ),
    (
        "requests_have_user_messages",
        "every request has its user message, unless the session's history was cleared"
        " (clear-history) or purged (session purge) after it",
        """
        SELECT r.session_id::text, r.id
        FROM session_requests r
        WHERE {scope[r.session_id]} AND NOT EXISTS (
            SELECT 1 FROM session_messages m
            WHERE m.session_id = r.session_id AND m.session_request_id = r.id
              AND m.role = 'user')
          AND NOT EXISTS (
            SELECT 1 FROM session_history_clears c
            WHERE c.session_id = r.session_id AND c.last_request_id >= r.id)
        """,
    ),
    (
        "purges_only_expired_sessions",
        "every purged history belonged to a session already expired when it was purged",
        """
        SELECT c.session_id::text, c.id, c.cleared_at
        FROM session_history_clears c JOIN sessions s ON s.id = c.session_id
        WHERE c.macaroon_identifier = 'purge' AND s.expires_at > c.cleared_at
          AND {scope[c.session_id]}
        """,
    ),
    (
        "requests_complete",
        "no request is stuck half-done",
        "SELECT session_id::text, id FROM session_requests"
        " WHERE completed_at IS NULL AND {scope[session_id]}",
    ),
    (
        "indexes_valid",
        "no index is left invalid by an interrupted CREATE INDEX CONCURRENTLY",
        migrations.INVALID_INDEXES,
    ),
    (
        "message_roles_per_request",
        "no request has more than one user or one assistant message",
        """
        SELECT session_id::text, session_request_id, role, count(*)
        FROM session_messages WHERE {scope[session_id]}
        GROUP BY session_id, session_request_id, role
        HAVING count(*) > 1
        """,
    ),
)


# Sessions where a message has no request, a request has no user message (cleared
# histories are left to the checks), or a request has two messages of one role (or a
# message of another role). The messages index (sql/0028) and the requests' primary key
# are both in (session, request) order: an index-only merge, with no sort or hash table.
SUSPECTS = """
SELECT DISTINCT coalesce(r.session_id, k.session_id)
FROM session_requests r
FULL JOIN (
    SELECT session_id, session_request_id,
           count(*) FILTER (WHERE role = 'user') AS users,
           count(*) FILTER (WHERE role = 'assistant') AS assistants,
           count(*) AS messages
    FROM session_messages GROUP BY session_id, session_request_id
) k ON k.session_id = r.session_id AND k.session_request_id = r.id
WHERE r.id IS NULL OR k.users IS DISTINCT FROM 1 OR k.assistants > 1
   OR k.messages > k.users + k.assistants
"""
SUSPECTED = ("messages_have_requests", "requests_have_user_messages", "message_roles_per_request")

# A full run's forms of checks whose scoped form joins twice or per session.
FULL_FORMS: dict[str, str] = {
    # One hashed full join of the requests and the debits instead of a join each way.
    "debits_match_requests": """
        SELECT coalesce(r.session_id, l.session_id)::text, coalesce(r.id, l.session_request_id),
               r.debited_sats, coalesce(l.amount_sats, 0)
        FROM session_requests r
        FULL JOIN (
            SELECT session_id, session_request_id, amount_sats
            FROM balance_ledger WHERE kind = 'debit'
        ) l ON l.session_id = r.session_id AND l.session_request_id = r.id
        WHERE r.id IS NULL OR r.debited_sats <> coalesce(l.amount_sats, 0)
        """,
}

# Memory per sort or hash table of a full run's checks (SET LOCAL, for each statement):
# enough to hash a million sessions' ledger totals in one batch, and a store's requests
# in a few. PostgreSQL gives a hash table hash_mem_multiplier (by default 2) times this.
FULL_WORK_MEM = "256MB"
FULL_SETTINGS: Settings = (("work_mem", f"'{FULL_WORK_MEM}'"),)
# The suspects' pass is a merge of two indexes read in order: with memory to spare the
# planner would hash the messages by request instead, and spill them to disk.
SUSPECTS_SETTINGS: Settings = (("enable_hashagg", "off"), ("enable_hashjoin", "off"))


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    ran: bool = True  # False: the check could not run (cancelled, no privilege): not a fault


class _Scope:
    """`{scope[column]}` in a check: every session, or those in the %(scope)s array."""

    def __init__(self, sessions: list[str] | None) -> None:
        self.sessions = sessions

    def __getitem__(self, column: str) -> str:
        return "TRUE" if self.sessions is None else f"{column} = ANY(%(scope)s::uuid[])"


def _rows(conn: psycopg.Connection, sql: str, scope: _Scope, settings: Settings = ()) -> list[Row]:
    """The query's rows, in a savepoint, under `settings` for this statement only."""
    query = sql.format(scope=scope) if "{scope[" in sql else sql
    params = {"scope": scope.sessions} if "%(scope)s" in query else None
    with conn.transaction():  # a savepoint: a cancelled check leaves the others running
        for name, value in settings:
            conn.execute(f"SET LOCAL {name} = {value}")
        rows = conn.execute(query, params).fetchall()
        for name, _ in settings:
            conn.execute(f"SET LOCAL {name} TO DEFAULT")
    return rows


def _run_check(conn: psycopg.Connection, name: str, summary: str, sql: str, scope: _Scope) -> Check:
    full = scope.sessions is None
    try:
        if full:
            rows = _rows(conn, FULL_FORMS.get(name, sql), scope, FULL_SETTINGS)
        else:
            rows = _rows(conn, sql, scope)
    except psycopg.Error as error:
        if conn.broken or conn.closed:
            raise  # the server went away: exit 8, not an inconsistency

        return _not_run(name, error)
    if not rows:
        return Check(name, True, summary)
    shown = "; ".join(" ".join(str(v) for v in row) for row in rows[:SAMPLE])
    more = f" (and {len(rows) - SAMPLE} more)" if len(rows) > SAMPLE else ""
    return Check(name, False, f"{len(rows)} at fault: {shown}{more}")


def _migrations_check(conn: psycopg.Connection, directory: Path) -> Check:
    try:
        files = migrations.discover(directory)
    except Exception as error:
        return Check("migrations_match_files", False, str(error))
    states = migrations.status(files, migrations.read_ledger(conn))
    bad = [
        f"version {s.version} {s.state}"
        for s in states
        if s.state in ("changed", "missing", "duplicate")
    ]
    pending = [s.version for s in states if s.state == "pending"]
    if bad:
        return Check("migrations_match_files", False, ", ".join(bad))
    if pending:
        return Check("migrations_match_files", False, f"pending: {', '.join(map(str, pending))}")
    return Check("migrations_match_files", True, f"{len(states)} applied, all match their files")


def run_checks(
    conn: psycopg.Connection, directory: Path | None = None, sessions: list[str] | None = None
) -> list[Check]:
    """Every check; over the given sessions only (their every row), or over all."""
    scope = _Scope(sessions)
    suspects: _Scope | psycopg.Error | None = None
    if sessions is None:
        try:
            found = _rows(conn, SUSPECTS, scope, SUSPECTS_SETTINGS)
            # Past FULL_ABOVE, each suspected check reads every session itself.
            many = len(found) > watermarks.FULL_ABOVE
            suspects = scope if many else _Scope([str(row[0]) for row in found])
        except psycopg.Error as error:
            if conn.broken or conn.closed:
                raise
            suspects = error
    results = [_migrations_check(conn, directory or migrations.default_dir())]
    for name, summary, sql in CHECKS:
        if suspects is not None and name in SUSPECTED:
            if isinstance(suspects, psycopg.Error):
                results.append(_not_run(name, suspects))
            elif suspects.sessions == []:
                results.append(Check(name, True, summary))
            else:
                results.append(_run_check(conn, name, summary, sql, suspects))
        else:
            results.append(_run_check(conn, name, summary, sql, scope))
    return results


@dataclass(frozen=True)
class Examination:
    checks: list[Check]
    full: bool  # every session was checked
    sessions: int | None  # how many changed sessions were checked (None: all)
    recorded: bool  # the watermarks moved to this run's start


def examine(
    reader: psycopg.Connection,
    writer: Callable[[], psycopg.Connection],
    directory: Path | None = None,
    *,
    full: bool = False,
) -> Examination:
    """A doctor run: what changed since the last clean run (or all), then the watermarks.

    `reader` may be a replica; `writer()` gives the primary, asked for only to record
    the watermarks after a clean run.
    """
    missing: Check | None = None
    try:
        stored = watermarks.read(reader)
        marks = None if full else stored
        begin: watermarks.Start | None = watermarks.start(reader, stored)
    except psycopg.errors.UndefinedTable:
        marks, begin = None, None  # migrations pending: say so, check everything
    except psycopg.Error as error:
        if reader.broken or reader.closed:
            raise
        marks, begin = None, None
        missing = _not_run("watermarks", error)
    with reader.transaction():
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        sessions = None if marks is None else watermarks.changed_sessions(reader, marks)
        if sessions is not None and len(sessions) > watermarks.FULL_ABOVE:
            sessions = None
        checks = run_checks(reader, directory, sessions)
    counted = None if sessions is None else len(sessions)
    if missing is not None:
        checks.append(missing)
    if not all(c.ok for c in checks) or begin is None or not begin.settled:
        return Examination(checks, sessions is None, counted, False)
    try:
        watermarks.record(writer(), begin.marks, full=sessions is None)
    except psycopg.Error as error:
        checks.append(_not_run("watermarks", error, "could not record the watermarks: "))
        return Examination(checks, sessions is None, counted, False)
    return Examination(checks, sessions is None, counted, True)


def _not_run(name: str, error: Exception, what: str = "") -> Check:
    return Check(name, False, f"not run: {what}{first_line(error)}", ran=False)
