"""`doctor`: every invariant of the store, checked with SQL.

Each check is a query that returns the rows at fault (empty = the invariant
holds). Run them all; report each with a short detail naming what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg

from towerctl import migrations
from towerctl.db import first_line

SAMPLE = 5  # rows named in a failing check's detail

CHECKS: tuple[tuple[str, str, str], ...] = (
    (
        "balance_nonnegative",
        "every session's balance is >= 0",
        "SELECT id::text, balance_sats FROM sessions WHERE balance_sats < 0",
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
            FROM balance_ledger GROUP BY session_id
        ) l ON l.session_id = s.id
        WHERE s.balance_sats <> coalesce(l.net, 0)
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
        WHERE r.debited_sats <> coalesce(l.amount_sats, 0)
        UNION ALL
        SELECT l.session_id::text, l.session_request_id, NULL, l.amount_sats
        FROM balance_ledger l
        LEFT JOIN session_requests r
          ON r.session_id = l.session_id AND r.id = l.session_request_id
        WHERE l.kind = 'debit' AND r.id IS NULL
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
        WHERE r.id IS NULL
        """,
    ),
    (
        "requests_have_user_messages",
        "every request has its user message, unless the session's history was cleared"
        " (clear-history) or purged (session purge) after it",
        """
        SELECT r.session_id::text, r.id
        FROM session_requests r
        WHERE NOT EXISTS (
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
        """,
    ),
    (
        "requests_complete",
        "no request is stuck half-done",
        "SELECT session_id::text, id FROM session_requests WHERE completed_at IS NULL",
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
        FROM session_messages GROUP BY session_id, session_request_id, role
        HAVING count(*) > 1
        """,
    ),
)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    ran: bool = True  # False: the check could not run (cancelled, no privilege): not a fault


def _run_check(conn: psycopg.Connection, name: str, summary: str, sql: str) -> Check:
    try:
        rows = conn.execute(sql).fetchall()
    except psycopg.Error as error:
        if conn.broken or conn.closed:
            raise  # the server went away: exit 8, not an inconsistency

        return Check(name, False, f"not run: {first_line(error)}", ran=False)
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


def run_checks(conn: psycopg.Connection, directory: Path | None = None) -> list[Check]:
    results = [_migrations_check(conn, directory or migrations.default_dir())]
    for name, summary, sql in CHECKS:
        results.append(_run_check(conn, name, summary, sql))
    return results
