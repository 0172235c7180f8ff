"""Streaming (SPEC 15): on a terminal the reply is shown as it arrives (`openai:` with
`"stream": true`, `exec:` as its stdout comes), through the terminal sanitiser; the
request, debit and messages are written once it has ended; `--no-stream`, a pipe and
`--json` wait. Run on a real pseudo-terminal against a local server that sends a token
every 100 ms."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from agents_fixtures import exec_agent, openai_server
from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from terminal import emulate, on_pty, raw_hidden, read_pty
from towerctl.config import Pricing
from towerctl.errors import ExitCode
from towerctl.requests.rules import cost_sats

WORDS = [f"word{n} " for n in range(20)]  # 20 tokens, one every 100 ms: 2 s in all
REPLY = "".join(WORDS)


def store(url: str) -> tuple[list[tuple[str, int]], list[str], int]:
    """(requests' state and debit, messages' contents, the balance)."""
    with psycopg.connect(url) as c:
        requests = c.execute("SELECT state, debited_sats FROM session_requests ORDER BY id")
        messages = c.execute("SELECT content FROM session_messages ORDER BY id")
        balance = c.execute("SELECT balance_sats FROM sessions").fetchone()
        return requests.fetchall(), [m for (m,) in messages.fetchall()], (balance or [0])[0]


def on_terminal(
    args: list[str], env: dict[str, str]
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], int]]:
    """towerctl `args` on a 120-column xterm pty: (the process, the master side)."""
    return on_pty(args, {**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"})


def request_args(s: OpenedSession, agent: str, *more: str) -> list[str]:
    return ["session", "request", s.id, "hello", "--agent", agent, "--macaroon", s.macaroon, *more]


@pytest.mark.timeout(60)
def test_a_slow_stream_shows_its_first_words_before_it_ends(
    tower_env: dict[str, str], cli: CLI, db_url: str
) -> None:
    s = open_session(cli, 1000)
    usage = {"prompt_tokens": 2, "completion_tokens": 20}
    with (
        openai_server({"tokens": WORDS, "interval": 0.1, "usage": usage}) as (url, received),
        on_terminal(request_args(s, f"openai:{url}"), tower_env) as (proc, master),
    ):
        early = read_pty(master, 30, until=lambda d: b"word1 " in d, proc=proc)
        seen = time.monotonic()
        rest = read_pty(master, 30, proc=proc)
        ended = time.monotonic()
        code = proc.wait(timeout=30)
    assert b"word1 " in early and b"word19" not in early
    assert ended - seen > 1.0  # most of the 2 s stream was still to come
    assert code == ExitCode.OK
    screen = emulate(early + rest, columns=400)
    assert screen.text.count(REPLY.strip()) == 1  # the whole reply, shown once
    [sent] = received
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    # written once the reply had ended, as before: the transcript holds it exactly once
    requests, messages, balance = store(db_url)
    debit = cost_sats(Pricing(), 2, 20)
    assert requests == [("complete", debit)] and messages == ["hello", REPLY]
    assert balance == 1000 - debit
    transcript = cli("session", "messages", s.id, "--macaroon", s.macaroon, "--format", "json")
    assert transcript.exit_code == 0, transcript.stderr
    shown = json.loads(transcript.stdout)
    rows = shown["messages"] if isinstance(shown, dict) else shown
    assert [m["content"] for m in rows] == ["hello", REPLY]
    assert_store_consistent(db_url)


@pytest.mark.timeout(60)
def test_sigint_mid_stream_records_and_charges_nothing(
    tower_env: dict[str, str], cli: CLI, db_url: str
) -> None:
    s = open_session(cli, 1000)
    with (
        openai_server({"tokens": WORDS, "interval": 0.1}) as (url, _),
        on_terminal(request_args(s, f"openai:{url}"), tower_env) as (proc, master),
    ):
        early = read_pty(master, 30, until=lambda d: b"word2 " in d, proc=proc)
        assert b"word2 " in early
        os.killpg(proc.pid, signal.SIGINT)
        read_pty(master, 30, proc=proc)
        code = proc.wait(timeout=30)
    assert code == 130
    assert store(db_url) == ([], [], 1000)
    again = cli("session", "request", s.id, "hi", "--macaroon", s.macaroon)
    assert again.exit_code == ExitCode.OK  # the lease was given back: not busy
    assert_store_consistent(db_url)


@pytest.mark.timeout(60)
def test_a_stream_stalling_past_the_deadline_is_failed(
    tower_env: dict[str, str], cli: CLI, db_url: str
) -> None:
    s = open_session(cli, 1000)
    env = {**tower_env, "TOWER_AGENT_TIMEOUT": "1.5"}
    with (
        openai_server({"tokens": WORDS, "interval": 0.05, "stall": 3}) as (url, _),
        on_terminal(request_args(s, f"openai:{url}"), env) as (proc, master),
    ):
        started = time.monotonic()
        shown = read_pty(master, 30, proc=proc)
        code = proc.wait(timeout=30)
    assert time.monotonic() - started < 10
    assert code == ExitCode.AGENT_FAILED
    assert b"word0 word1 word2" in shown and b"timed out" in shown
    assert store(db_url)[0] == [("failed", 0)]
    assert_store_consistent(db_url)


@pytest.mark.timeout(60)
def test_a_stream_past_the_budget_is_cut_there_on_screen_and_in_the_store(
    tower_env: dict[str, str], cli: CLI, db_url: str
) -> None:
    """15 sats buy 33 output tokens after "hello" (2 tokens): 132 characters; the
    server ignores max_tokens and streams 600."""
    s = open_session(cli, 15)
    tokens = ["abcdefghij" for _ in range(60)]
    with (
        openai_server({"tokens": tokens}) as (url, received),
        on_terminal(request_args(s, f"openai:{url}"), tower_env) as (proc, master),
    ):
        shown = read_pty(master, 30, proc=proc)
        code = proc.wait(timeout=30)
    assert code == ExitCode.OK
    assert received[0]["max_tokens"] == 33
    cut = ("abcdefghij" * 60)[:132]
    assert emulate(shown, columns=400).text.strip() == cut
    requests, messages, balance = store(db_url)
    assert requests == [("complete", 15)] and messages == ["hello", cut] and balance == 0


@pytest.mark.timeout(60)
def test_exec_output_is_shown_as_it_arrives_and_sanitised(
    tower_env: dict[str, str], cli: CLI, db_url: str, tmp_path: Path
) -> None:
    body = "import time\nprint('first \\x1b[31mred', flush=True)\ntime.sleep(1.5)\nprint('last')\n"
    agent = exec_agent(tmp_path, "slow.py", body)
    s = open_session(cli, 1000)
    with on_terminal(request_args(s, agent), tower_env) as (proc, master):
        early = read_pty(master, 30, until=lambda d: b"red" in d, proc=proc)
        seen = time.monotonic()
        rest = read_pty(master, 30, proc=proc)
        code = proc.wait(timeout=30)
        assert time.monotonic() - seen > 1.0  # shown while the agent still ran
    assert code == ExitCode.OK
    text = (early + rest).decode()
    assert raw_hidden(text) == [] and "\\x1b[31mred" in text
    assert text.count("last") == 1 and text.count("first") == 1
    assert store(db_url)[1] == ["hello", "first \x1b[31mred\nlast"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--no-stream", "--json"])
def test_no_stream_and_json_ask_for_no_stream(
    tower_env: dict[str, str], cli: CLI, db_url: str, flag: str
) -> None:
    s = open_session(cli, 1000)
    with (
        openai_server({"tokens": WORDS, "reply": REPLY}) as (url, received),
        on_terminal(request_args(s, f"openai:{url}", flag), tower_env) as (proc, master),
    ):
        shown = read_pty(master, 30, proc=proc)
        code = proc.wait(timeout=30)
    assert code == ExitCode.OK
    assert "stream" not in received[0]
    assert REPLY.strip() in shown.decode()
    if flag == "--json":
        assert json.loads(shown.decode())["result"] == REPLY


def test_on_a_pipe_the_reply_is_printed_after_the_write(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    with openai_server({"tokens": WORDS, "reply": REPLY}) as (url, received):
        result = cli("session", "request", s.id, "hello", "--agent", f"openai:{url}",
                     "--macaroon", s.macaroon)  # fmt: skip
    assert result.exit_code == ExitCode.OK and result.stdout == REPLY + "\n"
    assert "stream" not in received[0]


# --- hostile streams: the deadline, the size bounds and strict parsing apply ------------


def streamed(behaviour: dict[str, object], budget: int = 10_000, timeout: float = 5):  # type: ignore[no-untyped-def]
    """The openai agent's reply to a streamed request, and the pieces it showed."""
    from towerctl.agents import ChatMessage
    from towerctl.agents.openai_agent import OpenAIAgent
    from towerctl.bounds import http_body_bytes

    pieces: list[str] = []
    with openai_server(behaviour) as (url, _):
        agent = OpenAIAgent(url, "m", None, timeout, http_body_bytes(1000), max_reply_chars=1000)
        reply = agent.answer("s", [ChatMessage("user", "hi")], budget, pieces.append)
    return reply, pieces


def event(content: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": content}}]}).encode() + b"\n\n"


@pytest.mark.timeout(60)
def test_an_endless_stream_line_is_failed_within_bounds() -> None:
    started = time.monotonic()
    reply, _ = streamed({"events": [b'data: {"choices": '], "endless": True})
    assert reply.state == "failed" and "longer than" in reply.text
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ([b"data: {not json\n\n"], "not JSON"),
        ([b"data: " + b"[" * 5000 + b"]" * 5000 + b"\n\n"], "nested"),
        ([b'data: {"choices": [{"delta": {"content": 7}}]}\n\n'], "unexpected"),
        ([event("half a reply")], "ended before"),  # the connection closes: no [DONE]
        ([event("x"), b'data: {"choices": [], "usage": {"completion_tokens": -1}}\n\n'], "invalid"),
    ],
)
def test_malformed_streams_are_failed(events: list[bytes], words: str) -> None:
    reply, _ = streamed({"events": [*events]})
    assert reply.state == "failed" and words in reply.text, reply


def test_a_stream_longer_than_the_reply_bound_is_not_read_past_it() -> None:
    """The bound is 1,000 characters; the stream would send 100,000 (and never ends)."""
    reply, pieces = streamed({"events": [event("y" * 100) for _ in range(1000)], "endless": False})
    assert len(reply.text) <= 1100 and reply.truncated
    assert "".join(pieces) == reply.text


def test_usage_from_the_final_chunk_and_the_stop_reason() -> None:
    final = b'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}\n\n'
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}}\n\n'
    reply, pieces = streamed(
        {"events": [event("a"), event("b"), final, usage, b"data: [DONE]\n\n"]}
    )
    assert (reply.state, reply.text, reply.truncated) == ("complete", "ab", True)
    assert (reply.input_tokens, reply.output_tokens) == (3, 9) and pieces == ["a", "b"]


def test_a_streamed_refusal_is_a_rejection() -> None:
    refusal = b'data: {"choices": [{"delta": {"refusal": "No."}, "finish_reason": "stop"}]}\n\n'
    reply, pieces = streamed({"events": [refusal, b"data: [DONE]\n\n"]})
    assert (reply.state, reply.text, pieces) == ("rejected", "No.", [])


@pytest.mark.timeout(60)
def test_a_stream_past_the_reply_bound_is_failed_on_a_terminal(
    tower_env: dict[str, str], cli: CLI, db_url: str
) -> None:
    """As an answer in one body is: TOWER_MAX_REPLY_CHARS=100 and 600 characters
    streamed (the budget, 25 tokens, is the bound's): failed, nothing charged."""
    s = open_session(cli, 10_000)
    env = {**tower_env, "TOWER_MAX_REPLY_CHARS": "100"}
    with (
        openai_server({"tokens": ["abcdefghij"] * 60}) as (url, received),
        on_terminal(request_args(s, f"openai:{url}"), env) as (proc, master),
    ):
        shown = read_pty(master, 30, proc=proc)
        code = proc.wait(timeout=30)
    assert code == ExitCode.AGENT_FAILED, shown
    assert received[0]["max_tokens"] == 25
    assert store(db_url)[0] == [("failed", 0)]
