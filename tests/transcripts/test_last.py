"""`session messages --last N`: the last N of the selection, in order, in every format."""

from __future__ import annotations

import csv
import io
import json
import re

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CLI, OpenedSession, open_session
from towerctl.errors import ExitCode

REQUESTS = 24


@pytest.fixture
def seeded(cli: CLI, conn: psycopg.Connection) -> tuple[OpenedSession, list[tuple[int, str]]]:
    """A session with an irregular history: some messages deleted, so roles do not simply
    alternate and ids have gaps. Returns the session and its (id, role) rows."""
    s = open_session(cli, 1_000_000)
    for n in range(REQUESTS):
        result = cli("session", "request", s.id, f"message {n}", "--macaroon", s.macaroon)
        assert result.exit_code == ExitCode.OK, result.stderr
    conn.execute("DELETE FROM session_messages WHERE session_id = %s AND id %% 7 = 3", (s.id,))
    rows = conn.execute(
        "SELECT id, role FROM session_messages WHERE session_id = %s ORDER BY id", (s.id,)
    ).fetchall()
    return s, [(int(i), str(r)) for i, r in rows]


def expected(
    rows: list[tuple[int, str]], last: int, after: int | None, before: int | None, role: str | None
) -> list[int]:
    chosen = [
        i
        for i, r in rows
        if (after is None or i > after)
        and (before is None or i < before)
        and (role is None or r == role)
    ]
    return chosen[-last:]


def ids_of(fmt: str, text: str) -> list[int]:
    if fmt == "json":
        doc = json.loads(text)
        assert doc["nextCursor"] is None
        return [m["id"] for m in doc["messages"]]
    if fmt == "ndjson":
        return [json.loads(line)["id"] for line in text.splitlines()]
    if fmt == "csv":
        return [int(r[0]) for r in list(csv.reader(io.StringIO(text, newline="")))[1:]]
    if fmt == "markdown":
        return [int(m) for m in re.findall(r"^## #(\d+) ", text, re.M)]
    return [int(m) for m in re.findall(r"^\s*(\d+)\s+\d{4}-\d\d-\d\dT", text, re.M)]


@pytest.mark.timeout(600)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_last_matches_a_computed_expectation(
    cli: CLI, seeded: tuple[OpenedSession, list[tuple[int, str]]], data: st.DataObject
) -> None:
    s, rows = seeded
    ids = [i for i, _ in rows]
    last = data.draw(st.integers(1, len(rows) + 3), label="last")
    after = data.draw(st.none() | st.sampled_from(ids), label="after")
    before = data.draw(st.none() | st.sampled_from(ids), label="before")
    role = data.draw(st.none() | st.sampled_from(["user", "assistant"]), label="role")
    fmt = data.draw(st.sampled_from(["json", "ndjson", "csv", "markdown", "table"]), label="fmt")
    args = ["--last", str(last), "--format", fmt]
    for flag, value in (("--after", after), ("--before", before), ("--role", role)):
        if value is not None:
            args += [flag, str(value)]
    result = cli("session", "messages", s.id, *args, "--macaroon", s.macaroon)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert ids_of(fmt, result.stdout) == expected(rows, last, after, before, role)
    assert "more messages follow" not in result.stderr


def test_last_is_the_tail_and_its_cursor_is_null(
    cli: CLI, seeded: tuple[OpenedSession, list[tuple[int, str]]]
) -> None:
    s, rows = seeded
    ids = [i for i, _ in rows]
    out = cli("session", "messages", s.id, "--last", "5", "-f", "json", "--macaroon", s.macaroon)
    doc = json.loads(out.stdout)
    assert [m["id"] for m in doc["messages"]] == ids[-5:]
    assert doc["nextCursor"] is None
    # --before cuts the selection: the page is still its tail, so still no cursor
    # (as a --limit page that reaches --before has none).
    cut = ids[10]
    out = cli(
        "session", "messages", s.id, "--last", "3", "--before", str(cut), "-f", "json",
        "--macaroon", s.macaroon,
    )  # fmt: skip
    doc = json.loads(out.stdout)
    assert [m["id"] for m in doc["messages"]] == ids[7:10]
    assert doc["nextCursor"] is None


def test_limit_and_last_are_exclusive(
    cli: CLI, seeded: tuple[OpenedSession, list[tuple[int, str]]]
) -> None:
    s, _ = seeded
    result = cli(
        "session", "messages", s.id, "--limit", "2", "--last", "2", "--macaroon", s.macaroon
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "--limit and --last" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["0", "-1", "x", "10000001"])
def test_last_out_of_range_is_a_usage_error(
    cli: CLI, seeded: tuple[OpenedSession, list[tuple[int, str]]], value: str
) -> None:
    s, _ = seeded
    result = cli("session", "messages", s.id, "--last", value, "--macaroon", s.macaroon)
    assert result.exit_code == ExitCode.BAD_INPUT


def test_last_of_an_empty_selection(cli: CLI) -> None:
    s = open_session(cli)
    result = cli("session", "messages", s.id, "--last", "3", "-f", "json", "--macaroon", s.macaroon)
    assert result.exit_code == ExitCode.OK
    assert json.loads(result.stdout)["messages"] == []
