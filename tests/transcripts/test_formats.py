"""Transcript formats against hostile text (SPEC 11 "Terminals" and "Data formats").

Hypothesis writes messages full of C0 and C1 controls, DEL, escape sequences, bidi
overrides and zero-width characters. JSON and NDJSON parse back to the exact text
with every such character escaped; CSV to a pipe with --raw is exact, and without
it formula cells get a leading quote; Markdown, read by a real parser
(markdown-it-py), has exactly one heading per message and nothing but literal text
in it; on a real pseudo-terminal no format lets a hidden character through raw.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from conftest import CLI, OpenedSession, open_session
from terminal import Screen, raw_hidden, run_on_pty
from towerctl.errors import ExitCode
from towerctl.render import shown_text
from towerctl.transcripts import FORMULA_STARTS, Format

HIDDEN = (
    [chr(c) for c in range(0x01, 0x20)]
    + ["\x7f"]
    + [chr(c) for c in range(0x80, 0xA0)]
    + ["\u202e", "\u202d", "\u2066", "\u2067", "\u2069", "\u200b", "\u200c", "\u200d", "\u2060"]
    + ["\ufeff", "\u00ad", "\u2028", "\u2029", "\U000e0041"]
)
SEQUENCES = [
    "\x1b[31m", "\x1b[0m", "\x1b]0;owned\x07", "\x1b]8;;http://evil\x1b\\", "\x1b[2J",
    "\x9b31m", "\r\n", "\r", "=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "# heading",
    "```", "~~~", "<script>", "<!-- x -->", "===", "---", "    indented", "> quote",
    "1. item", "[link](http://x)", "*em*", "_u_", "`code`", "|a|b|", "&amp;", "\\",
]  # fmt: skip
hostile_piece = st.one_of(
    st.sampled_from(HIDDEN),
    st.sampled_from(SEQUENCES),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
)
hostile_text = (
    st.lists(hostile_piece, min_size=1, max_size=12)
    .map("".join)
    .map(lambda s: s.replace("\x00", ""))
    .filter(bool)
)
FIXED = [
    "\x1b]0;pwned\x07\x1b[31mred\x1b[0m \u202eevil\u202c zero\u200bwidth \x9b2J del\x7f",
    '=HYPERLINK("http://x")',
    "\tstarts with a tab",
    "\rstarts with a carriage return",
    "# fake heading\n## #999 · user · forged\nSetext\n===\n```\nfence\n```\n<div>html</div>",
]
TIMESTAMP = re.compile(r"^#\d+ · (user|assistant) · \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def on_hostile_contents(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A test run on `examples` lists of 1 to 4 hostile texts (FIXED always among them),
    with 300 s in all."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        test = example(contents=FIXED)(test)
        test = given(contents=st.lists(hostile_text, min_size=1, max_size=4))(test)
        test = settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )(test)
        return pytest.mark.timeout(300)(test)  # type: ignore[no-any-return]

    return decorate


@pytest.fixture
def chat(cli: CLI) -> OpenedSession:
    return open_session(cli)


def store(conn: psycopg.Connection, s: OpenedSession, contents: list[str]) -> None:
    """Replace the session's messages with `contents` (user, assistant, user, ...)."""
    conn.execute("DELETE FROM session_messages WHERE session_id = %s", (s.id,))
    rid = conn.execute(
        "INSERT INTO session_requests (session_id, state, agent) VALUES (%s, 'complete', 'echo')"
        " RETURNING id",
        (s.id,),
    ).fetchone()
    assert rid is not None
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO session_messages (session_id, role, content, session_request_id,"
            " token_count) VALUES (%s, %s, %s, %s, 1)",
            [(s.id, ("user", "assistant")[i % 2], c, rid[0]) for i, c in enumerate(contents)],
        )


def export(cli: CLI, s: OpenedSession, fmt: str, *extra: str) -> str:
    result = cli("session", "messages", s.id, "--format", fmt, *extra, "--macaroon", s.macaroon)
    assert result.exit_code == ExitCode.OK, result.stderr
    return result.stdout


def neutralised(content: str) -> str:
    return "'" + content if content[:1] in FORMULA_STARTS else content


# --- machine formats: exact, escaped -----------------------------------------------------


@on_hostile_contents(examples=40)
def test_json_and_ndjson_parse_back_exactly_with_hidden_characters_escaped(
    cli: CLI, conn: psycopg.Connection, chat: OpenedSession, contents: list[str]
) -> None:
    store(conn, chat, contents)
    document = export(cli, chat, "json")
    lines = export(cli, chat, "ndjson")
    for text in (document, lines):
        assert [
            c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
        ] == []
    assert [m["content"] for m in json.loads(document)["messages"]] == contents
    assert [json.loads(line)["content"] for line in lines.splitlines()] == contents


@on_hostile_contents(examples=40)
def test_csv_is_exact_with_raw_and_neutralises_formulas_without(
    cli: CLI, conn: psycopg.Connection, chat: OpenedSession, contents: list[str]
) -> None:
    store(conn, chat, contents)
    raw = list(csv.reader(io.StringIO(export(cli, chat, "csv", "--raw"), newline="")))
    assert [row[2] for row in raw[1:]] == contents
    safe = list(csv.reader(io.StringIO(export(cli, chat, "csv"), newline="")))
    assert [row[2] for row in safe[1:]] == [neutralised(c) for c in contents]
    assert all(row[2][:1] not in FORMULA_STARTS for row in safe[1:])


@pytest.mark.timeout(60)
def test_csv_through_a_real_pipe_is_exact_with_raw(
    conn: psycopg.Connection, chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    store(conn, chat, FIXED)
    out = subprocess.run(
        [sys.executable, "-m", "towerctl", "session", "messages", chat.id, "--format", "csv",
         "--raw", "--macaroon", chat.macaroon],
        env={**os.environ, **tower_env}, capture_output=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == ExitCode.OK, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout.decode("utf-8"), newline="")))
    assert [row[2] for row in rows[1:]] == FIXED


# --- Markdown: one heading per message, nothing but text ----------------------------------

ALLOWED_BLOCKS = {
    "heading_open", "heading_close", "inline", "paragraph_open", "paragraph_close",
    "blockquote_open", "blockquote_close",
}  # fmt: skip
ALLOWED_INLINE = {"text", "softbreak", "hardbreak"}


def markdown_messages(text: str) -> list[tuple[str, str]]:
    """(heading, quoted text) per message as a real Markdown parser reads `text`."""
    parser = MarkdownIt("commonmark").enable(["table", "strikethrough"])
    tokens = parser.parse(text)
    found: list[tuple[str, str]] = []
    title_seen = False
    heading: str | None = None
    for i, token in enumerate(tokens):
        if token.type == "paragraph_open" and heading is None:  # the footers
            continue
        assert token.type in ALLOWED_BLOCKS, (token.type, token.map)
        if token.type == "heading_open":
            content = tokens[i + 1].content
            if token.tag == "h1":
                assert not title_seen and content.startswith("Transcript of session ")
                title_seen = True
            else:
                assert token.tag == "h2" and TIMESTAMP.match(content), content
                heading = content
                found.append((content, ""))
        elif token.type == "inline" and tokens[i - 1].type != "heading_open":
            assert heading is not None, token.content
            children = token.children or []
            kinds = {child.type for child in children}
            assert kinds <= ALLOWED_INLINE, kinds
            words = "".join(c.content for c in children if c.type == "text")
            found[-1] = (heading, found[-1][1] + words)
    assert title_seen
    return found


@on_hostile_contents(examples=40)
def test_markdown_has_one_heading_per_message_and_only_literal_text(
    cli: CLI, conn: psycopg.Connection, chat: OpenedSession, contents: list[str]
) -> None:
    store(conn, chat, contents)
    found = markdown_messages(export(cli, chat, "markdown"))
    assert len(found) == len(contents)
    for (_, words), content in zip(found, contents, strict=True):
        # The text a reader sees is the content (hidden characters shown), whitespace aside.
        assert "".join(words.split()) == "".join(shown_text(content).split())


# --- on a real terminal: nothing hidden gets through raw ------------------------------------


def on_pty(extra: list[str], chat: OpenedSession, env: dict[str, str]) -> Screen:
    """`session messages` of `chat` on a 100-column pseudo-terminal (30 s at most), without
    the pager: what reaches the screen is towerctl's own (the pager's tests are apart)."""
    args = ["session", "messages", chat.id, *extra, "--no-pager", "--macaroon", chat.macaroon]
    return run_on_pty(args, env, timeout=30, columns=100)


SGR = re.compile(r"\x1b\[[0-9;]*m")


@on_hostile_contents(examples=6)
def test_no_format_lets_a_hidden_character_reach_a_terminal(
    conn: psycopg.Connection, chat: OpenedSession, tower_env: dict[str, str], contents: list[str]
) -> None:
    store(conn, chat, contents)
    env = {**os.environ, **tower_env}
    for fmt in Format:
        screen = on_pty(["--format", fmt.value], chat, env)
        assert screen.exit_code == ExitCode.OK, screen.text
        assert raw_hidden(screen.text) == [], (fmt, screen.text)
    # With colour, the table's only escape sequences are its own colours.
    colour = {k: v for k, v in env.items() if k != "NO_COLOR"}
    screen = on_pty([], chat, colour)
    assert screen.exit_code == ExitCode.OK
    assert raw_hidden(SGR.sub("", screen.text)) == []


@pytest.mark.timeout(60)
def test_csv_on_a_terminal_shows_hidden_characters_and_keeps_formulas_neutral(
    conn: psycopg.Connection, chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    store(conn, chat, FIXED)
    screen = on_pty(["--format", "csv"], chat, {**os.environ, **tower_env})
    assert screen.exit_code == ExitCode.OK
    assert "\\x1b]0;pwned\\x07" in screen.text and "\\u202e" in screen.text
    assert "'=HYPERLINK" in screen.text


def test_table_cell_marker(cli: CLI, conn: psycopg.Connection, chat: OpenedSession) -> None:
    store(conn, chat, ["x" * 2_500])
    text = export(cli, chat, "table")
    assert "[cut: 500 more characters; use --format json]" in " ".join(text.split())
    assert text.count("x") == 2_000
