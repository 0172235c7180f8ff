"""Agents that misbehave: servers that drip, bomb, overflow or lie; programs that linger,
flood or spawn children. Each ends as a recorded `failed` request (exit 6), charged nothing,
within the agent's one deadline and with bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents_fixtures import (
    TOWERCTL,
    completion,
    exec_agent,
    gzip_bomb,
    openai_server,
    pid_alive,
    recorded,
    run_measured,
)
from conftest import CLI, OpenedSession, Result, assert_store_consistent, open_session
from terminal import run_on_pty
from towerctl import sanitize
from towerctl.errors import ExitCode


def request(cli: CLI, s: OpenedSession, *args: str, input: str | bytes | None = None):  # type: ignore[no-untyped-def]
    return cli("session", "request", s.id, *args, "--macaroon", s.macaroon, input=input)


def assert_failed(result: Any, url: str, words: str) -> dict[str, Any]:
    assert result.exit_code == ExitCode.AGENT_FAILED, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["state"] == "failed" and doc["debitedSats"] == 0
    assert words in doc["errorMessage"], doc["errorMessage"]
    assert len(doc["errorMessage"]) < 600
    assert recorded(url) == [("failed", 0)]
    assert_store_consistent(url)
    return doc


# --- openai: one deadline, a size cap, strict usage ---------------------------------------


@pytest.mark.timeout(30)
def test_openai_slow_drip_is_cut_at_the_overall_deadline(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.2 s keeps every single read short: only one deadline for the whole
    call ends it (the drip of the full answer would take well over 20 s)."""
    monkeypatch.setenv("TOWER_AGENT_TIMEOUT", "2")
    s = open_session(cli, 1000)
    with openai_server({"drip": 0.2}) as (url, _):
        started = time.monotonic()
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
        took = time.monotonic() - started
    assert_failed(result, db_url, "timed out after 2s")
    assert took < 3.5, took


@pytest.mark.timeout(30)
def test_openai_gzip_bomb_stops_at_the_decompressed_cap(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_MAX_REPLY_CHARS", "1000")  # body cap 12,000 + 64 KiB
    s = open_session(cli, 1000)
    with openai_server({"raw": gzip_bomb(64 << 20), "encoding": "gzip"}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert_failed(result, db_url, "larger than 77,536 bytes")


@pytest.mark.timeout(60)
def test_openai_gzip_bomb_of_256_mb_keeps_towerctl_under_200_mb(
    tower_env: dict[str, str], cli: CLI, tmp_path: Path
) -> None:
    s = open_session(cli, 1000)
    with openai_server({"raw": gzip_bomb(256 << 20), "encoding": "gzip"}) as (url, _):
        code, peak_mb, _out, _err = run_measured(
            ["session", "request", s.id, "hi", "--agent", f"openai:{url}", "--macaroon", s.macaroon]
        )
    assert code == ExitCode.AGENT_FAILED
    assert peak_mb < 200, peak_mb


@pytest.mark.timeout(60)
def test_openai_endless_body_stops_at_the_cap(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    with openai_server({"endless": True}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert_failed(result, db_url, "larger than")


@pytest.mark.timeout(30)
def test_openai_compressed_answer_is_read(cli: CLI, db_url: str) -> None:
    import gzip

    s = open_session(cli, 1000)
    body = gzip.compress(json.dumps(completion("squeezed", {"prompt_tokens": 3})).encode())
    with openai_server({"raw": body, "encoding": "gzip"}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["result"] == "squeezed" and doc["inputTokens"] == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("behaviour", "words"),
    [
        ({"raw": b"{not json"}, "not JSON"),
        ({"raw": b"[" * 100_000}, "nested too deeply"),
        ({"body": {"choices": []}}, "unexpected body"),
        ({"body": {"nothing": 1}}, "unexpected body"),
        ({"body": [1, 2]}, "unexpected body"),
        ({"body": {"choices": [{"message": {"content": 5}}]}}, "unexpected body"),
        ({"raw": b"\x1f\x8b\x08garbage", "encoding": "gzip"}, "compressed body"),
        ({"raw": b"{}", "encoding": "br"}, "unsupported content encoding"),
        ({"usage": {"prompt_tokens": True}}, "invalid prompt_tokens"),
        ({"usage": {"completion_tokens": -1}}, "invalid completion_tokens"),
        ({"usage": {"prompt_tokens": 3_000_000_000}}, "invalid prompt_tokens"),
        ({"usage": {"prompt_tokens": 10_000_001}}, "invalid prompt_tokens"),
        ({"usage": {"prompt_tokens": 1.5}}, "invalid prompt_tokens"),
        ({"usage": {"prompt_tokens": "7"}}, "invalid prompt_tokens"),
        ({"usage": [7]}, "usage that is not an object"),
        (
            {"status": 308, "raw": b"", "headers": ["Location: https://new.example/v1/x"]},
            "a redirect to https://new.example/v1/x; towerctl does not follow redirects",
        ),
        (
            {
                "status": 301,
                "raw": b"<html>moved</html>",
                "headers": ["Location: http://h.example/v2/chat/completions"],
            },
            "(use openai:http://h.example/v2)",
        ),
        ({"status": 302, "raw": b"moved"}, "HTTP 302, a redirect without a Location"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_openai_malformed_answers_are_recorded_failed(
    cli: CLI, db_url: str, behaviour: dict[str, Any], words: str
) -> None:
    s = open_session(cli, 1000)
    with openai_server(behaviour) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert_failed(result, db_url, words)


@pytest.mark.timeout(30)
def test_openai_usage_at_the_bound_is_taken(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 100_000_000)
    usage = {"prompt_tokens": 10_000_000, "completion_tokens": 0, "total_tokens": 1}
    with openai_server({"usage": usage}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["inputTokens"] == 10_000_000


@pytest.mark.timeout(30)
def test_openai_reply_past_the_reply_bound_is_failed(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_MAX_REPLY_CHARS", "100")
    s = open_session(cli, 1000)
    with openai_server({"reply": "r" * 100}) as (url, _):
        assert request(cli, s, "a", "--agent", f"openai:{url}").exit_code == ExitCode.OK
    with openai_server({"reply": "r" * 101}) as (url, _):
        result = request(cli, s, "b", "--agent", f"openai:{url}", "--json")
    assert result.exit_code == ExitCode.AGENT_FAILED
    assert "101 characters; the maximum is 100" in json.loads(result.stdout)["errorMessage"]


# --- exec: process group, deadline, output cap ------------------------------------------

CHILD_SLEEPS = """
import subprocess, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({pidfile!r}, "w").write(str(child.pid))
{then}
"""


def request_leaving_a_child(cli: CLI, tmp_path: Path, then: str) -> tuple[Result, float, int]:
    """A request to an agent that starts a sleeping child, then does `then`:
    (its result, the seconds it took, the child's pid)."""
    pidfile = tmp_path / "child.pid"
    agent = exec_agent(
        tmp_path, "leaves_child.py", CHILD_SLEEPS.format(pidfile=str(pidfile), then=then)
    )
    s = open_session(cli, 1000)
    started = time.monotonic()
    result = request(cli, s, "hi", "--agent", agent, "--json")
    return result, time.monotonic() - started, int(pidfile.read_text())


@pytest.mark.timeout(30)
def test_exec_agent_children_die_at_the_deadline(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_AGENT_TIMEOUT", "1")
    result, seconds, child = request_leaving_a_child(cli, tmp_path, "time.sleep(60)")
    assert seconds < 3
    assert_failed(result, db_url, "timed out after 1s")
    time.sleep(0.2)
    assert not pid_alive(child)


@pytest.mark.timeout(30)
def test_exec_agent_children_die_when_it_is_done(cli: CLI, db_url: str, tmp_path: Path) -> None:
    """An agent that answers and exits while its child holds stdout open: the answer is
    taken at once and the child killed (it neither outlives the request nor stalls it)."""
    result, seconds, child = request_leaving_a_child(cli, tmp_path, "print('done', flush=True)")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["result"] == "done"
    assert seconds < 10
    assert not pid_alive(child)


@pytest.mark.timeout(60)
def test_exec_agent_printing_100_mb_is_failed_and_bounded(
    tower_env: dict[str, str], cli: CLI, db_url: str, tmp_path: Path
) -> None:
    flood = exec_agent(
        tmp_path,
        "flood.py",
        "block = b'y' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.buffer.write(block)",
    )
    s = open_session(cli, 1000)
    code, peak_mb, out, _err = run_measured(
        ["session", "request", s.id, "hi", "--agent", flood, "--macaroon", s.macaroon, "--json"]
    )
    assert code == ExitCode.AGENT_FAILED
    assert "larger than 800,001 bytes" in json.loads(out)["errorMessage"]
    assert peak_mb < 200, peak_mb
    assert recorded(db_url) == [("failed", 0)]


@pytest.mark.timeout(30)
def test_exec_agent_output_at_the_byte_cap(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TOWER_MAX_REPLY_CHARS=10 reads at most 41 bytes of stdout: 41 pass the read (and
    then fail the character bound), 42 fail the read; 10 characters of 4 bytes pass."""
    monkeypatch.setenv("TOWER_MAX_REPLY_CHARS", "10")
    s = open_session(cli, 1000)
    four = exec_agent(tmp_path, "four.py", "sys.stdout.write('\U0001f600' * 10)")
    assert request(cli, s, "a", "--agent", four).exit_code == ExitCode.OK
    over = exec_agent(tmp_path, "over.py", "sys.stdout.write('z' * 42)")
    result = request(cli, s, "b", "--agent", over, "--json")
    assert "larger than 41 bytes" in json.loads(result.stdout)["errorMessage"]


@pytest.mark.timeout(30)
def test_exec_agent_that_ignores_a_big_stdin_still_answers(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    """The conversation is written while output is read: an agent that never reads its
    stdin (and a message larger than a pipe buffer) neither deadlocks nor fails."""
    agent = tmp_path / "deaf.py"
    agent.write_text(f"#!{sys.executable}\nprint('not listening')\n")
    agent.chmod(0o755)
    s = open_session(cli, 100_000)
    result = request(cli, s, "m" * 30_000, "--agent", f"exec:{agent}")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stdout == "not listening\n"


@pytest.mark.timeout(60)
def test_a_15_mb_decline_leaves_one_bounded_stderr_line(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    reason = "sys.stdout.write('no\\x1b]0;owned\\x07\\n' * {}); sys.exit(10)"
    huge = exec_agent(tmp_path, "decline.py", reason.format(800_000))
    s = open_session(cli, 1000)
    result = request(cli, s, "hi", "--agent", huge)
    assert result.exit_code == ExitCode.AGENT_FAILED  # past the output cap: failed
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 500
    assert "\x1b" not in result.stderr
    long_decline = exec_agent(tmp_path, "decline2.py", reason.format(10_000))
    declined = request(cli, s, "hi", "--agent", long_decline)
    assert declined.exit_code == ExitCode.NOT_SERVED
    assert declined.stderr.count("\n") == 1 and len(declined.stderr) < 500
    assert "\x1b" not in declined.stderr and "\x07" not in declined.stderr


# --- what a reply does to a terminal --------------------------------------------------------

HOSTILE_REPLY = (
    "title\x1b]0;pwned\x07 red\x1b[31m clear\x1b[2J c1\x9b31m bidi\u202eevil\u202c"
    " zw\u200bsp\u2066iso\u2069 del\x7f bell\x07 cr\roverwrite"
)


def on_pty(args: list[str]) -> tuple[int, str]:
    """towerctl with stdout and stderr on a real 80-column pseudo-terminal (stdin /dev/null,
    30 s at most); (exit code, all it showed)."""
    screen = run_on_pty(args, dict(os.environ), timeout=30, columns=80, stdin_closed=True)
    return screen.exit_code, screen.text


def assert_nothing_raw(shown: str) -> None:
    """Only printable text and line ends (the pty turns \\n into \\r\\n) reached the screen."""
    plain = shown.replace("\r\n", "\n")
    raw = [c for c in plain if c not in "\n\t" and not sanitize.is_clean(c)]
    assert raw == [], raw[:10]


@pytest.mark.timeout(60)
def test_a_hostile_reply_is_shown_visibly_on_a_terminal_and_exact_on_a_pipe(
    tower_env: dict[str, str], cli: CLI, tmp_path: Path
) -> None:
    replies = tmp_path / "reply.txt"
    replies.write_text(HOSTILE_REPLY, encoding="utf-8", newline="")
    agent = exec_agent(
        tmp_path, "hostile.py", f"sys.stdout.write(open({str(replies)!r}, newline='').read())"
    )
    s = open_session(cli, 10_000)
    args = ["session", "request", s.id, "hi", "--agent", agent, "--macaroon", s.macaroon]
    code, shown = on_pty(args)
    assert code == ExitCode.OK, shown
    assert_nothing_raw(shown)
    assert "\\x1b]0;pwned\\x07" in shown and "\\u202eevil" in shown and "\\x0doverwrite" in shown
    piped = subprocess.run([TOWERCTL, *args], capture_output=True, timeout=30)
    assert piped.returncode == ExitCode.OK
    assert piped.stdout.decode("utf-8") == HOSTILE_REPLY + "\n"  # data on a pipe stays exact


@pytest.mark.timeout(60)
def test_a_hostile_decline_and_error_reach_the_terminal_as_one_visible_line(
    tower_env: dict[str, str], cli: CLI, tmp_path: Path
) -> None:
    s = open_session(cli, 10_000)
    text = HOSTILE_REPLY.replace("\n", " ")
    # The decline's reason is stdout, shown as it arrives (one line), then the rejection.
    for name, body, expected, lines in (
        ("no.py", f"sys.stdout.write({text!r}); sys.exit(10)", ExitCode.NOT_SERVED, 2),
        ("err.py", f"sys.stderr.write({text!r} * 100); sys.exit(3)", ExitCode.AGENT_FAILED, 1),
    ):
        agent = exec_agent(tmp_path, name, body)
        code, shown = on_pty(
            ["session", "request", s.id, "hi", "--agent", agent, "--macaroon", s.macaroon]
        )
        assert code == expected, shown
        assert_nothing_raw(shown)
        assert shown.count("\n") == lines and len(shown) < 600 * lines, shown


HIDDEN_CHARS = st.sampled_from(
    ["\x1b", "\x1b[2J", "\x1b]0;t\x07", "\x9b", "\x85", "\x7f", "\x07", "\r", "\x08",
     "\u202e", "\u202d", "\u2066", "\u200b", "\u200f", "\ufeff", "\u2028", "\U000e0041"]
)  # fmt: skip


@pytest.mark.timeout(300)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(HIDDEN_CHARS, st.text(min_size=1, max_size=5)), min_size=1, max_size=12))
def test_hypothesis_hostile_replies_never_reach_a_terminal_raw(
    tower_env: dict[str, str], cli: CLI, parts: list[str]
) -> None:
    # "x" first: a message of "-" alone means "read stdin", and blank ones are refused.
    message = "x" + "".join(parts).replace("\x00", "")
    s = open_session(cli, 100_000)
    code, shown = on_pty(["session", "request", s.id, message, "--macaroon", s.macaroon])
    assert code == ExitCode.OK, shown
    assert_nothing_raw(shown)
