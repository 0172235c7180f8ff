"""`session list`: creation window, sort by activity, cursor paging, a header, narrow lines."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import psycopg

from conftest import CLI
from towerctl.errors import ExitCode

BASE = datetime(2026, 3, 1, tzinfo=UTC)


def _seed(conn: psycopg.Connection, n: int = 9) -> list[tuple[str, datetime, datetime]]:
    """Sessions created an hour apart; activity in the reverse order; two share a time."""
    made = []
    for i in range(n):
        sid = str(uuid.uuid4())
        created = BASE + timedelta(hours=min(i, n - 2))  # the last two share created_at
        active = BASE + timedelta(days=2, hours=n - i)
        conn.execute(
            "INSERT INTO sessions (id, state, balance_sats, created_at, last_activity_at,"
            " expires_at) VALUES (%s, 'active', %s, %s, %s, now() + interval '1 day')",
            (sid, 10 * i, created, active),
        )
        made.append((sid, created, active))
    return made


def _pages(cli: CLI, *args: str) -> tuple[list[str], int]:
    ids: list[str] = []
    cursor: list[str] = []
    pages = 0
    while True:
        result = cli("session", "list", *args, *cursor, "--json")
        assert result.exit_code == ExitCode.OK, result.stderr
        doc = json.loads(result.stdout)
        ids += [s["sessionId"] for s in doc["sessions"]]
        pages += 1
        if doc["nextCursor"] is None:
            return ids, pages
        cursor = ["--after", doc["nextCursor"]]


def test_cursor_paging_walks_every_session_once_in_order(
    cli: CLI, conn: psycopg.Connection
) -> None:
    made = _seed(conn)
    by_created = [s for s, _, _ in sorted(made, key=lambda m: (m[1], m[0]), reverse=True)]
    ids, pages = _pages(cli, "--limit", "2")
    assert ids == by_created and pages == 5
    by_activity = [s for s, _, _ in sorted(made, key=lambda m: (m[2], m[0]), reverse=True)]
    ids, _ = _pages(cli, "--limit", "4", "--sort", "activity")
    assert ids == by_activity
    short = cli("session", "list", "--limit", "3", "--after", by_created[2][:8], "--json")
    assert [s["sessionId"] for s in json.loads(short.stdout)["sessions"]] == by_created[3:6]


def test_since_and_until_select_by_creation(cli: CLI, conn: psycopg.Connection) -> None:
    made = _seed(conn)
    since, until = BASE + timedelta(hours=2), BASE + timedelta(hours=5)
    window = ["--since", since.isoformat(), "--until", until.isoformat()]
    doc = json.loads(cli("session", "list", *window, "--json").stdout)
    expected = {s for s, created, _ in made if since <= created < until}
    assert {s["sessionId"] for s in doc["sessions"]} == expected and len(expected) == 3


def test_the_text_form_has_a_header_and_narrow_lines(cli: CLI, conn: psycopg.Connection) -> None:
    made = _seed(conn, 3)
    result = cli("session", "list")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "SATS", "CREATED"]
    assert len(lines) == 4 and max(len(line) for line in lines) <= 85
    assert made[0][0] in result.stdout
    activity = cli("session", "list", "--sort", "activity", "--limit", "1")
    assert "LAST ACTIVITY" in activity.stdout and "--after" in activity.stderr


def test_bad_cursors_and_windows(cli: CLI, conn: psycopg.Connection) -> None:
    _seed(conn, 2)
    missing = cli("session", "list", "--after", str(uuid.uuid4()))
    assert missing.exit_code == ExitCode.NOT_FOUND
    assert cli("session", "list", "--sort", "balance").exit_code == ExitCode.BAD_INPUT
    assert cli("session", "list", "--since", "1h", "--until", "2h").exit_code == ExitCode.BAD_INPUT
