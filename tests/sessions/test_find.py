"""`session find`: full-text search matches an oracle over planted words, with filters,
paging and snippets that cannot reach a terminal's controls (SPEC 16)."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CLI
from towerctl.errors import ExitCode

VOCAB = ["refund", "cutoff", "answer", "invoice", "zebra", "quasar", "lantern", "mango"]
FILLER = ["the", "a", "my", "was", "yesterday", "about", "please", "help"]
BASE = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Planted:
    session_id: str
    message_id: int
    role: str
    created_at: datetime
    words: frozenset[str]
    state: str


def seed(conn: psycopg.Connection, sessions: int = 8, per_session: int = 10) -> list[Planted]:
    rng = random.Random(26)
    planted: list[Planted] = []
    at = BASE
    for n in range(sessions):
        sid = str(uuid.uuid4())
        state = "paused" if n % 3 == 0 else "active"
        conn.execute(
            "INSERT INTO sessions (id, state, balance_sats, created_at, last_activity_at,"
            " expires_at) VALUES (%s, %s, 0, %s, %s, now() + interval '1 day')",
            (sid, state, BASE, BASE),
        )
        (rid,) = conn.execute(
            "INSERT INTO session_requests (session_id, state, agent) VALUES (%s, 'complete',"
            " 'echo') RETURNING id",
            (sid,),
        ).fetchone()
        for i in range(per_session):
            at += timedelta(minutes=rng.randrange(1, 90))
            role = ("user", "assistant")[i % 2]
            words = rng.sample(VOCAB, rng.randrange(0, 3))
            text = words + rng.sample(FILLER, 4)
            rng.shuffle(text)
            content = " ".join(w.upper() if rng.random() < 0.2 else w for w in text) + "."
            (mid,) = conn.execute(
                "INSERT INTO session_messages (session_id, role, content, session_request_id,"
                " token_count, created_at) VALUES (%s, %s, %s, %s, 1, %s) RETURNING id",
                (sid, role, content, rid, at),
            ).fetchone()
            planted.append(Planted(sid, mid, role, at, frozenset(words), state))
    return planted


@pytest.fixture
def store(conn: psycopg.Connection) -> Iterator[list[Planted]]:
    yield seed(conn)


def find_all(cli: CLI, *args: str) -> list[dict[str, object]]:
    """Every match, following the cursor page by page."""
    found: list[dict[str, object]] = []
    cursor: list[str] = []
    for _ in range(200):
        result = cli("session", "find", *args, *cursor, "--json")
        assert result.exit_code == ExitCode.OK, result.stderr
        doc = json.loads(result.stdout)
        assert set(doc) == {"matches", "nextCursor"}
        found += doc["matches"]
        if doc["nextCursor"] is None:
            return found
        cursor = ["--after", str(doc["nextCursor"])]
    raise AssertionError("paging did not end")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    word=st.sampled_from(VOCAB),
    role=st.sampled_from([None, "user", "assistant"]),
    state=st.sampled_from([None, "paused", "active"]),
    limit=st.integers(1, 7),
    window=st.tuples(st.integers(0, 900), st.integers(1, 900)),
)
def test_find_matches_the_oracle_with_filters_and_paging(
    cli: CLI,
    store: list[Planted],
    word: str,
    role: str | None,
    state: str | None,
    limit: int,
    window: tuple[int, int],
) -> None:
    since = BASE + timedelta(minutes=window[0] * 5)
    until = since + timedelta(minutes=window[1] * 5)
    args = [word, "--limit", str(limit), "--since", since.isoformat(), "--until", until.isoformat()]
    args += ["--role", role] if role else []
    args += ["--state", state] if state else []
    expected = [
        p
        for p in store
        if word in p.words
        and since <= p.created_at < until
        and role in (None, p.role)
        and state in (None, p.state)
    ]
    expected.sort(key=lambda p: p.message_id, reverse=True)
    found = find_all(cli, *args)
    assert [m["messageId"] for m in found] == [p.message_id for p in expected]
    for m, p in zip(found, expected, strict=True):
        assert set(m) == {"sessionId", "messageId", "role", "createdAt", "snippet"}
        assert m["sessionId"] == p.session_id and m["role"] == p.role
        assert f"«{word}»" in str(m["snippet"]).lower()


def test_websearch_syntax_and_case(cli: CLI, store: list[Planted]) -> None:
    both = {p.message_id for p in store if {"refund", "zebra"} <= p.words}
    either = {p.message_id for p in store if p.words & {"refund", "zebra"}}
    without = {p.message_id for p in store if "refund" in p.words and "zebra" not in p.words}
    assert {m["messageId"] for m in find_all(cli, "REFUND zebra")} == both
    assert {m["messageId"] for m in find_all(cli, "refund or zebra")} == either
    assert {m["messageId"] for m in find_all(cli, "refund -zebra")} == without


def test_text_output_and_refusals(cli: CLI, store: list[Planted]) -> None:
    newest = max((p for p in store if "mango" in p.words), key=lambda p: p.message_id)
    plain = cli("session", "find", "mango", "--limit", "1")
    assert plain.exit_code == ExitCode.OK
    assert newest.session_id in plain.stdout and f"#{newest.message_id}" in plain.stdout
    assert "«mango»" in plain.stdout.lower() and "--after" in plain.stderr
    nothing = cli("session", "find", "nonexistentword")
    assert nothing.exit_code == ExitCode.OK and nothing.stdout == ""
    assert cli("session", "find", "  ... ").exit_code == ExitCode.BAD_INPUT
    assert cli("session", "find", "x", "--role", "bot").exit_code == ExitCode.BAD_INPUT
    assert cli("session", "find", "x", "--since", "soon").exit_code == ExitCode.BAD_INPUT


def test_hostile_snippets_are_shown_not_obeyed(cli: CLI, conn: psycopg.Connection) -> None:
    sid = str(uuid.uuid4())
    conn.execute("INSERT INTO sessions (id, state) VALUES (%s, 'active')", (sid,))
    (rid,) = conn.execute(
        "INSERT INTO session_requests (session_id, state, agent) VALUES (%s, 'complete',"
        " 'echo') RETURNING id",
        (sid,),
    ).fetchone()
    hostile = "\x1b]0;owned\x07 \x1b[2J refund \u202e \x02forged\x03 \x9b31m end"
    conn.execute(
        "INSERT INTO session_messages (session_id, role, content, session_request_id,"
        " token_count) VALUES (%s, 'user', %s, %s, 1)",
        (sid, hostile, rid),
    )
    shown = cli("session", "find", "refund")
    assert shown.exit_code == ExitCode.OK
    for control in ("\x1b", "\x07", "\u202e", "\x9b", "\x02", "\x03"):
        assert control not in shown.stdout
    assert "«refund»" in shown.stdout and "«forged»" not in shown.stdout
    doc = json.loads(cli("session", "find", "refund", "--json").stdout)
    assert "«forged»" not in doc["matches"][0]["snippet"]


def test_the_search_uses_the_gin_index(conn: psycopg.Connection) -> None:
    from towerctl.search import FIND

    conn.execute("SET enable_seqscan = off")
    params = {"text": "refund", "after": None, "since": None, "until": None, "role": None,
              "state": None, "limit": 21}  # fmt: skip
    plan = conn.execute("EXPLAIN " + FIND, params).fetchall()
    assert "session_messages_content_search_idx" in "\n".join(r[0] for r in plan)


def test_a_long_message_of_distinct_words_is_still_written(conn: psycopg.Connection) -> None:
    sid = str(uuid.uuid4())
    conn.execute("INSERT INTO sessions (id, state) VALUES (%s, 'active')", (sid,))
    (rid,) = conn.execute(
        "INSERT INTO session_requests (session_id, state, agent) VALUES (%s, 'complete',"
        " 'echo') RETURNING id",
        (sid,),
    ).fetchone()
    content = " ".join(f"w{i:x}é" for i in range(150_000))  # ~1 MB of distinct words
    conn.execute(
        "INSERT INTO session_messages (session_id, role, content, session_request_id,"
        " token_count) VALUES (%s, 'user', %s, %s, 1)",
        (sid, content, rid),
    )
