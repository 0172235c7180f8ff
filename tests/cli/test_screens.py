"""The screens people read, read as a person would (SPEC 17).

Each command runs on a real pseudo-terminal; what arrives is fed to a terminal
emulator (pyte) and the tests assert on the emulated screen: the words in their
cells, colours where a terminal gets colours, no escape code shown as text, and
hostile content shown visibly without moving the cursor or setting the title.
The same commands with NO_COLOR, and on a pipe, give plain text.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psycopg
import pytest

import faults
from conftest import CLI, OpenedSession, open_session
from terminal import TOWERCTL, Emulated, emulate, on_pty, read_pty, run_on_screen
from towerctl.errors import ExitCode

pytestmark = pytest.mark.timeout(90)

# What an escape code looks like once a terminal has shown it as text instead of obeying it.
SHOWN_CODE = re.compile(r"(\\x1b|\x1b)?\[[0-9;]*m")
HOSTILE = "\x1b]0;pwned\x07\x1b[2Jcleared \u202eevil\u202c"


@pytest.fixture
def chat(cli: CLI, conn: psycopg.Connection) -> OpenedSession:
    """A session with a plain exchange, then one with hostile content."""
    opened = open_session(cli, deposit=500)
    for message in ("hello tower", HOSTILE):
        done = cli("session", "request", opened.id, message, "--macaroon", opened.macaroon)
        assert done.exit_code == ExitCode.OK, done.stderr
    return opened


def colour_env(tower_env: dict[str, str]) -> dict[str, str]:
    """The test environment as a person's terminal has it: colours allowed."""
    env = faults.process_env(tower_env)
    env.pop("NO_COLOR", None)
    return env


def assert_no_code_as_text(screen: Emulated) -> None:
    assert SHOWN_CODE.search(screen.text) is None, screen.text


def assert_hostile_shown_not_obeyed(screen: Emulated) -> None:
    assert screen.title == ""  # the OSC did not set the window title
    row = screen.row_with("cleared")
    assert "\\x1b]0;pwned\\x07\\x1b[2Jcleared" in row  # shown visibly, in its cell
    assert "\\u202eevil\\u202c" in row
    assert "hello tower" in screen.text  # the clear-screen did not wipe earlier rows


def messages_args(chat: OpenedSession, *extra: str) -> list[str]:
    return ["session", "messages", chat.id, *extra, "--macaroon", chat.macaroon]


def test_transcript_table_on_a_terminal_is_coloured_cells_not_codes(
    chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    code, screen = run_on_screen(messages_args(chat), colour_env(tower_env))
    assert code == ExitCode.OK, screen.text
    header = screen.row_with("time (UTC)")
    assert header.split() == ["id", "time", "(UTC)", "role", "content"]
    first = screen.row_with("hello tower").split()
    assert first[0] == "1" and first[2] == "user" and first[3:] == ["hello", "tower"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first[1])  # milliseconds kept
    assert screen.row_with("assistant").split()[0] == "2"
    assert {"cyan", "green"} <= screen.colored and screen.bold_cells > 0
    assert_no_code_as_text(screen)
    assert_hostile_shown_not_obeyed(screen)


def test_transcript_table_with_no_color_is_plain_on_a_terminal(
    chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    code, screen = run_on_screen(messages_args(chat), faults.process_env(tower_env))
    assert code == ExitCode.OK, screen.text
    assert screen.colored == set() and screen.bold_cells == 0
    assert screen.row_with("hello tower").split()[2] == "user"
    assert_no_code_as_text(screen)
    assert_hostile_shown_not_obeyed(screen)


def test_transcript_table_on_a_pipe_is_plain_text(
    chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    done = subprocess.run(
        [*TOWERCTL, *messages_args(chat)],
        env=colour_env(tower_env),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == ExitCode.OK, done.stderr
    assert b"\x1b" not in done.stdout
    assert b"hello tower" in done.stdout


def test_follow_table_on_a_terminal_is_coloured_cells_not_codes(
    chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    env = {**colour_env(tower_env), "TERM": "xterm-256color", "COLUMNS": "120"}
    with on_pty(messages_args(chat, "--follow"), env, stdin_closed=True) as (proc, master):
        data = read_pty(master, 30, until=lambda seen: b"cleared" in seen, proc=proc)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        data += read_pty(master, 30, proc=proc)
        assert proc.wait(timeout=30) == ExitCode.OK
    screen = emulate(data)
    assert screen.row_with("hello tower").split()[2] == "user"
    assert {"cyan", "green"} <= screen.colored
    assert_no_code_as_text(screen)
    assert_hostile_shown_not_obeyed(screen)


@pytest.mark.parametrize(
    "args",
    [
        ["session", "list"],
        ["migrate", "status"],
        ["doctor"],
        ["--help"],
        ["session", "messages", "--help"],
    ],
    ids=lambda args: " ".join(args),
)
def test_every_read_screen_shows_words_not_codes(
    args: list[str], chat: OpenedSession, tower_env: dict[str, str]
) -> None:
    for env in (colour_env(tower_env), faults.process_env(tower_env)):
        code, screen = run_on_screen(args, env)
        assert code == ExitCode.OK, screen.text
        assert screen.text.strip(), args
        assert_no_code_as_text(screen)
        assert screen.title == ""
    piped = subprocess.run(
        [*TOWERCTL, *args], env=colour_env(tower_env), capture_output=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert piped.returncode == ExitCode.OK and piped.stdout.strip()
    assert b"\x1b" not in piped.stdout + piped.stderr  # plain text on a pipe


def test_session_show_on_a_terminal(chat: OpenedSession, tower_env: dict[str, str]) -> None:
    code, screen = run_on_screen(["session", "show", chat.id], colour_env(tower_env))
    assert code == ExitCode.OK, screen.text
    assert chat.id in screen.row_with("session")
    assert "active" in screen.text
    assert_no_code_as_text(screen)


# --- the pager --------------------------------------------------------------------


def long_chat(cli: CLI, conn: psycopg.Connection) -> OpenedSession:
    """A session of 120 messages: more than a 40-line screen."""
    opened = open_session(cli, deposit=500)
    rid = conn.execute(
        "INSERT INTO session_requests (session_id, state, agent) VALUES (%s, 'complete', 'echo')"
        " RETURNING id",
        (opened.id,),
    ).fetchone()
    assert rid is not None
    conn.execute(
        "INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)"
        " SELECT %s, CASE WHEN g %% 2 = 1 THEN 'user' ELSE 'assistant' END, 'line ' || g, %s, 1"
        " FROM generate_series(1, 120) g",
        (opened.id, rid[0]),
    )
    return opened


def pager_env(tower_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {**colour_env(tower_env), "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40"}
    for name in ("PAGER", "TOWER_PAGER", "LESS"):
        env.pop(name, None)
    env["LESSHISTFILE"] = "-"
    return {**env, **extra}


def test_long_output_on_a_terminal_goes_through_the_pager_and_q_ends_it(
    cli: CLI, conn: psycopg.Connection, tower_env: dict[str, str]
) -> None:
    chat = long_chat(cli, conn)
    with on_pty(messages_args(chat), pager_env(tower_env)) as (proc, master):
        shown = read_pty(master, 30, until=lambda seen: b"line 30" in seen)
        time.sleep(0.5)
        assert proc.poll() is None  # waiting in the pager: the screen is full
        shown += read_pty(master, 0.5)
        assert b"line 120" not in shown  # only the first screen so far
        os.write(master, b"q")
        assert proc.wait(timeout=30) == ExitCode.OK
        shown += read_pty(master, 5)
    screen = emulate(shown, 100, 40)
    assert_no_code_as_text(screen)
    assert "line 1" in screen.text


@pytest.mark.parametrize("how", ["--no-pager", "PAGER=cat", "short"])
def test_the_pager_is_bypassed(
    how: str, cli: CLI, conn: psycopg.Connection, tower_env: dict[str, str]
) -> None:
    """--no-pager and PAGER=cat print everything at once; output shorter than the screen
    leaves less at once (-F): none of them waits for a key."""
    chat = long_chat(cli, conn) if how != "short" else open_session(cli)
    extra = {"PAGER": "cat"} if how == "PAGER=cat" else {}
    args = messages_args(chat, "--no-pager") if how == "--no-pager" else messages_args(chat)
    with on_pty(args, pager_env(tower_env, **extra)) as (proc, master):
        shown = read_pty(master, 30, proc=proc)
        assert proc.wait(timeout=30) == ExitCode.OK
    if how != "short":
        assert b"line 120" in shown
