"""`session messages` and `session clear-history` against real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from towerctl import transcripts
from towerctl.errors import ExitCode

TRICKY = [
    'He said "hi", then left',
    "line one\nline two\r\nline three",
    "ünïcødé — 日本語 — emoji 🚀",
    "back\\slash, tab\there, comma,, and 'single' quotes",
    "# not a heading\n> not a quote\n```\ncode\n```",
    "control \x01\x1f chars",
    "\x1b[31mred alert\x1b[0m from a hostile agent",
]
MESSAGE_KEYS = ["id", "role", "content", "sessionRequestId", "createdAt", "requestState"]


@pytest.fixture
def chat(cli: CLI) -> OpenedSession:
    s = open_session(cli, 100_000)
    for text in TRICKY:
        result = cli("session", "request", s.id, "-", "--macaroon", s.macaroon, input=text + "\n")
        assert result.exit_code == 0, result.stderr
    return s


def messages(cli: CLI, s: OpenedSession, *args: str, token: str | None = None):  # type: ignore[no-untyped-def]
    return cli("session", "messages", s.id, *args, "--macaroon", token or s.macaroon)


def expected_contents() -> list[str]:
    return [text for text in TRICKY for _ in ("user", "assistant")]


def test_json_shape_and_exact_content(cli: CLI, chat: OpenedSession) -> None:
    result = messages(cli, chat, "--format", "json")
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc) == ["sessionId", "messages", "nextCursor"]
    assert doc["sessionId"] == chat.id and doc["nextCursor"] is None
    assert all(list(m) == MESSAGE_KEYS for m in doc["messages"])
    assert [m["content"] for m in doc["messages"]] == expected_contents()
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant"] * len(TRICKY)
    ids = [m["id"] for m in doc["messages"]]
    assert ids == sorted(ids)
    assert [m["sessionRequestId"] for m in doc["messages"][::2]] == sorted(
        {m["sessionRequestId"] for m in doc["messages"]}
    )
    assert all(m["createdAt"].endswith("Z") and "T" in m["createdAt"] for m in doc["messages"])


def test_ndjson_is_one_object_per_line_matching_json(cli: CLI, chat: OpenedSession) -> None:
    lines = messages(cli, chat, "--format", "ndjson").stdout.splitlines()
    as_json = json.loads(messages(cli, chat, "--format", "json").stdout)["messages"]
    assert [json.loads(line) for line in lines] == as_json


def test_csv_round_trips_through_a_csv_reader(cli: CLI, chat: OpenedSession) -> None:
    text = messages(cli, chat, "--format", "csv").stdout
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == MESSAGE_KEYS
    assert [r[2] for r in rows[1:]] == expected_contents()
    as_json = json.loads(messages(cli, chat, "--format", "json").stdout)["messages"]
    assert [[int(r[0]), r[1], r[2], int(r[3]), r[4], r[5]] for r in rows[1:]] == [
        [m[k] for k in MESSAGE_KEYS] for m in as_json
    ]


def test_markdown_has_one_heading_per_message(cli: CLI, chat: OpenedSession) -> None:
    text = messages(cli, chat, "--format", "markdown").stdout
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert len(headings) == 2 * len(TRICKY)
    assert "· user ·" in headings[0] and "· assistant ·" in headings[1]
    assert "> \\# not a heading" in text and "> 日本語" not in text
    assert not any(line.startswith("# not") for line in text.splitlines())


def test_table_is_readable_at_80_columns_without_colour(
    cli: CLI, chat: OpenedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = messages(cli, chat).stdout
    assert "\x1b[" not in text, "escape sequences from content must not reach the terminal"
    assert "\\x1b[31mred alert" in text
    assert all(len(line) <= 80 for line in text.splitlines())
    assert "assistant" in text and "ünïcødé" in text
    assert "Z" in text and "T" in text


def test_paging_across_boundaries_loses_and_repeats_nothing(cli: CLI, chat: OpenedSession) -> None:
    everything = json.loads(messages(cli, chat, "--format", "json").stdout)["messages"]
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        args = ["--format", "json", "--limit", "5"] + (["--after", str(cursor)] if cursor else [])
        doc = json.loads(messages(cli, chat, *args).stdout)
        seen += [m["id"] for m in doc["messages"]]
        pages += 1
        cursor = doc["nextCursor"]
        if cursor is None:
            break
        assert cursor == doc["messages"][-1]["id"]
    assert seen == [m["id"] for m in everything]
    assert pages == 3
    ids = [m["id"] for m in everything]
    between = json.loads(
        messages(
            cli, chat, "--format", "json", "--after", str(ids[2]), "--before", str(ids[6])
        ).stdout
    )
    assert [m["id"] for m in between["messages"]] == ids[3:6]


def test_exact_page_end_has_null_cursor(cli: CLI, chat: OpenedSession) -> None:
    doc = json.loads(
        messages(cli, chat, "--format", "json", "--limit", str(2 * len(TRICKY))).stdout
    )
    assert doc["nextCursor"] is None and len(doc["messages"]) == 2 * len(TRICKY)


def test_role_filter(cli: CLI, chat: OpenedSession) -> None:
    doc = json.loads(messages(cli, chat, "--format", "json", "--role", "assistant").stdout)
    assert {m["role"] for m in doc["messages"]} == {"assistant"}
    assert len(doc["messages"]) == len(TRICKY)
    assert messages(cli, chat, "--role", "system").exit_code == ExitCode.BAD_INPUT


def test_scopes(cli: CLI, chat: OpenedSession) -> None:
    read_only = cli("macaroon", "attenuate", chat.macaroon, "--scope", "read").stdout.strip()
    request_only = cli("macaroon", "attenuate", chat.macaroon, "--scope", "request").stdout.strip()
    other = open_session(cli)
    assert messages(cli, chat, token=read_only).exit_code == ExitCode.OK
    assert messages(cli, chat, token=request_only).exit_code == ExitCode.UNAUTHORIZED
    assert messages(cli, chat, token=other.macaroon).exit_code == ExitCode.UNAUTHORIZED
    missing = cli("session", "messages", chat.id)
    assert missing.exit_code == ExitCode.UNAUTHORIZED


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--format", "xml"], ExitCode.BAD_INPUT),
        (["--limit", "0"], ExitCode.BAD_INPUT),
        (["--after", "-3"], ExitCode.BAD_INPUT),
        (["--after", "abc"], ExitCode.BAD_INPUT),
        (["--after", "999999"], ExitCode.NOT_FOUND),
        (["--before", "999999"], ExitCode.NOT_FOUND),
        (["-o", "/no/such/folder/out.json"], ExitCode.BAD_INPUT),
    ],
)
def test_bad_paging_input(cli: CLI, chat: OpenedSession, args: list[str], code: int) -> None:
    result = messages(cli, chat, *args)
    assert result.exit_code == code, result.stderr
    assert result.stdout == ""


def test_output_file_is_written_atomically(cli: CLI, chat: OpenedSession, tmp_path: Path) -> None:
    target = tmp_path / "transcript.ndjson"
    ok = messages(cli, chat, "--format", "ndjson", "-o", str(target))
    assert ok.exit_code == ExitCode.OK and ok.stdout == ""
    assert len(target.read_text().splitlines()) == 2 * len(TRICKY)
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    # Failures part way (disk full, signals, a lost server): tests/test_streams.py.


def test_output_file_for_every_format(cli: CLI, chat: OpenedSession, tmp_path: Path) -> None:
    for fmt in transcripts.Format:
        target = tmp_path / f"out.{fmt.value}"
        result = messages(cli, chat, "--format", fmt.value, "-o", str(target))
        assert result.exit_code == ExitCode.OK, (fmt, result.stderr)
        assert "ünïcødé" in target.read_text(encoding="utf-8")
    assert json.loads((tmp_path / "out.json").read_text())["sessionId"] == chat.id


def test_empty_history(cli: CLI) -> None:
    s = open_session(cli)
    doc = json.loads(messages(cli, s, "--format", "json").stdout)
    assert doc == {"sessionId": s.id, "messages": [], "nextCursor": None}
    assert messages(cli, s, "--format", "ndjson").stdout == ""
    assert messages(cli, s, "--format", "csv").stdout.strip() == ",".join(MESSAGE_KEYS)


def test_head_ends_quietly(chat: OpenedSession, tower_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "towerctl", "session", "messages", chat.id, "--format", "ndjson",
         "--macaroon", chat.macaroon],
        env={**os.environ, **tower_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    proc.wait(timeout=30)
    assert json.loads(first)["role"] == "user"
    assert proc.returncode == 0
    assert b"Traceback" not in proc.stderr.read()


# --- clear-history --------------------------------------------------------------------


def test_clear_history_keeps_requests_and_ledger(
    cli: CLI, chat: OpenedSession, db_url: str
) -> None:
    refused = cli("session", "clear-history", chat.id, "--macaroon", chat.macaroon)
    assert refused.exit_code == ExitCode.BAD_INPUT and "--yes" in refused.stderr
    read_only = cli("macaroon", "attenuate", chat.macaroon, "--scope", "read").stdout.strip()
    denied = cli("session", "clear-history", chat.id, "--yes", "--macaroon", read_only)
    assert denied.exit_code == ExitCode.UNAUTHORIZED
    with psycopg.connect(db_url) as c:
        before = c.execute("SELECT count(*) FROM session_messages").fetchone()
    assert before == (2 * len(TRICKY),)
    done = cli("session", "clear-history", chat.id, "--yes", "--macaroon", chat.macaroon)
    assert done.exit_code == ExitCode.OK
    assert f"deleted {2 * len(TRICKY)} messages" in done.stderr
    with psycopg.connect(db_url) as c:
        counts = c.execute(
            "SELECT (SELECT count(*) FROM session_messages),"
            " (SELECT count(*) FROM session_requests),"
            " (SELECT count(*) FROM balance_ledger),"
            " (SELECT count(*) FROM session_history_clears)"
        ).fetchone()
        who = c.execute("SELECT macaroon_identifier FROM session_history_clears").fetchone()
    assert counts == (0, len(TRICKY), 1 + len(TRICKY), 1)
    assert who is not None and who[0].startswith("towerctl1 key=")
    assert json.loads(messages(cli, chat, "--format", "json").stdout)["messages"] == []
    assert_store_consistent(db_url)
    # New requests after the clear start a new history.
    cli("session", "request", chat.id, "after the clear", "--macaroon", chat.macaroon)
    doc = json.loads(messages(cli, chat, "--format", "json").stdout)
    assert [m["content"] for m in doc["messages"]] == ["after the clear"] * 2
    assert_store_consistent(db_url)


def test_doctor_tells_a_lost_message_from_a_cleared_history(
    cli: CLI, chat: OpenedSession, db_url: str
) -> None:
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("DELETE FROM session_messages WHERE id = (SELECT min(id) FROM session_messages)")
    result = cli("doctor", "--json")
    assert result.exit_code == ExitCode.INCONSISTENT
    doc = json.loads(result.stdout)
    failed = [k for k in doc["checks"] if not k["ok"]]
    assert [k["name"] for k in failed] == ["requests_have_user_messages"]
    assert chat.id in failed[0]["detail"]


def test_output_to_a_symlink_writes_the_target_and_devices_are_streams(
    cli: CLI, chat: OpenedSession, tmp_path: Path
) -> None:
    target = tmp_path / "real.ndjson"
    target.write_text("old\n")
    link = tmp_path / "link.ndjson"
    link.symlink_to(target)
    assert messages(cli, chat, "--format", "ndjson", "-o", str(link)).exit_code == ExitCode.OK
    assert link.is_symlink()
    assert len(target.read_text().splitlines()) == 2 * len(TRICKY)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader there, as `cat pipe` is
    try:
        assert messages(cli, chat, "--format", "ndjson", "-o", str(fifo)).exit_code == 0
        assert len(os.read(reader, 1 << 16).splitlines()) == 2 * len(TRICKY)
    finally:
        os.close(reader)
    assert fifo.exists() and not fifo.is_file()  # written through, never replaced
    assert messages(cli, chat, "--format", "ndjson", "-o", "/dev/null").exit_code == 0
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_output_into_an_unwritable_folder_exits_2(cli: CLI, chat: OpenedSession) -> None:
    result = messages(cli, chat, "--format", "json", "-o", "/proc/towerctl-out.json")
    assert result.exit_code == ExitCode.BAD_INPUT


def test_messages_of_a_failed_or_refused_request_are_marked_in_every_format(cli: CLI) -> None:
    """An agent's error or a refusal is stored as an assistant message: every format says
    that request failed or was refused, so it never reads as a real answer."""
    session = open_session(cli, deposit=30)
    token = ("--macaroon", session.macaroon)
    assert cli("session", "request", session.id, "hello", *token).exit_code == ExitCode.OK
    failed = cli("session", "request", session.id, "fail", "--agent", "exec:/bin/false", *token)
    assert failed.exit_code == ExitCode.AGENT_FAILED
    refused = cli("session", "request", session.id, "x" * 4000, *token)
    assert refused.exit_code == ExitCode.NOT_SERVED
    done = cli("session", "messages", session.id, "--format", "json", *token)
    states = [(m["role"], m["requestState"]) for m in json.loads(done.stdout)["messages"]]
    assert states == [
        ("user", "complete"), ("assistant", "complete"),
        ("user", "failed"), ("assistant", "failed"),
        ("user", "rejected"), ("assistant", "rejected"),
    ]  # fmt: skip
    ndjson = cli("session", "messages", session.id, "--format", "ndjson", *token).stdout
    assert [json.loads(line)["requestState"] for line in ndjson.splitlines()] == [
        s for _, s in states
    ]
    csv_text = cli("session", "messages", session.id, "--format", "csv", *token).stdout
    assert csv_text.splitlines()[0].endswith(",requestState")
    markdown = cli("session", "messages", session.id, "--format", "markdown", *token).stdout
    headings = [line for line in markdown.splitlines() if line.startswith("## #")]
    assert [h.endswith(" · request failed") for h in headings] == [0, 0, 0, 1, 0, 0]
    assert headings[5].endswith(" · request rejected")
    table = cli("session", "messages", session.id, *token).stdout
    assert table.count("(failed)") == 1 and table.count("(rejected)") == 1


def test_json_flag_is_the_json_format(cli: CLI, chat: OpenedSession) -> None:
    assert messages(cli, chat, "--json").stdout == messages(cli, chat, "--format", "json").stdout
    clash = messages(cli, chat, "--json", "--format", "csv")
    assert clash.exit_code == ExitCode.BAD_INPUT


def test_table_rows_come_without_blank_lines(cli: CLI, chat: OpenedSession) -> None:
    """Nor between the chunks that --follow prints: they are the same tables, headless."""
    text = messages(cli, chat, "--last", "2").stdout
    assert "" not in [line.strip() for line in text.splitlines()]
