"""Session requests against real PostgreSQL: outcomes, money, context, agents, batch."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from agents_fixtures import exec_agent, openai_server
from conftest import CLI, OpenedSession, assert_store_consistent, direct, open_session
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import ExitCode
from towerctl.requests.rules import context_window, cost_sats, tokens

OUTCOME_KEYS = {
    "requestId", "sessionId", "state", "result", "reason", "errorMessage",
    "debitedSats", "balanceRemaining", "inputTokens", "outputTokens", "replayed", "truncated",
    "exitCode",
}  # fmt: skip


def request(cli: CLI, s: OpenedSession, *args: str, input: str | bytes | None = None):  # type: ignore[no-untyped-def]
    return cli("session", "request", s.id, *args, "--macaroon", s.macaroon, input=input)


def counts(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT (SELECT count(*) FROM session_requests),"
            " (SELECT count(*) FROM session_messages),"
            " (SELECT count(*) FROM balance_ledger WHERE kind = 'debit')"
        ).fetchone()
    assert row is not None
    return row


def messages(url: str, session_id: str) -> list[tuple[str, str, int]]:
    with psycopg.connect(url) as c:
        return c.execute(
            "SELECT role, content, token_count FROM session_messages"
            " WHERE session_id = %s ORDER BY id",
            (session_id,),
        ).fetchall()


def balance(url: str, session_id: str) -> tuple[str, int]:
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT state, balance_sats FROM sessions WHERE id = %s", (session_id,)
        ).fetchone()
    assert row is not None
    return row


# --- the pure parts ---------------------------------------------------------------


def test_cost_formula_defaults() -> None:
    p = Pricing()
    assert cost_sats(p, 0, 0) == 10
    assert cost_sats(p, 5, 5) == 10 + math.ceil(10 * 100 / 1000 * 1.4)  # 12
    assert cost_sats(p, 1000, 0) == 10 + 140
    assert cost_sats(p, 1, 0) == 11  # 0.14 rounds up
    assert cost_sats(Pricing(0, 100, 1.0), 10, 0) == 1  # exactly 1.0, no float drift to 2


def test_tokens_round_up() -> None:
    assert [tokens("x" * n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_context_window_keeps_last_n_and_trims_oldest_within_budget() -> None:
    newest_first = [("assistant", f"m{i}", 1000) for i in range(10, 0, -1)]
    window = context_window(newest_first, RequestLimits(context_messages=8, context_tokens=4000))
    assert [m.content for m in window] == ["m7", "m8", "m9", "m10"]
    small = context_window(newest_first, RequestLimits(context_messages=3, context_tokens=10**6))
    assert [m.content for m in small] == ["m8", "m9", "m10"]
    assert context_window([("user", "big", 5000)], RequestLimits()) == []


# --- outcomes ------------------------------------------------------------------------


def test_complete_request_debits_exactly_and_writes_both_messages(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    result = request(cli, s, "hello there, agent", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert set(doc) == OUTCOME_KEYS
    assert doc["state"] == "complete" and doc["result"] == "hello there, agent"
    assert doc["inputTokens"] == 5 and doc["outputTokens"] == 5
    assert doc["debitedSats"] == 12 and doc["balanceRemaining"] == 188
    assert messages(db_url, s.id) == [
        ("user", "hello there, agent", 5),
        ("assistant", "hello there, agent", 5),
    ]
    assert balance(db_url, s.id) == ("active", 188)
    plain = request(cli, s, "again")
    assert plain.stdout == "again\n"
    assert_store_consistent(db_url)


def test_input_tokens_count_the_context(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    request(cli, s, "a" * 40)  # 10 tokens each way
    doc = json.loads(request(cli, s, "b" * 8, "--json").stdout)
    assert doc["inputTokens"] == 10 + 10 + 2
    assert doc["debitedSats"] == cost_sats(Pricing(), 22, 2)


def test_rejected_for_balance_debits_nothing_and_pauses(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 11)
    result = request(cli, s, "x" * 400, "--json")  # 100 tokens: at least 24 sats
    assert result.exit_code == ExitCode.NOT_SERVED
    doc = json.loads(result.stdout)
    assert doc["state"] == "rejected" and doc["debitedSats"] == 0
    assert "insufficient balance" in doc["reason"] and doc["balanceRemaining"] == 11
    assert "rejected" in result.stderr
    assert balance(db_url, s.id) == ("paused", 11)
    assert [m[0] for m in messages(db_url, s.id)] == ["user", "assistant"]
    assert messages(db_url, s.id)[1][1] == doc["reason"]
    # A paused session serves nothing more, and writes nothing.
    before = counts(db_url)
    again = request(cli, s, "hi")
    assert again.exit_code == ExitCode.NOT_SERVED and "paused" in again.stderr
    assert counts(db_url) == before
    # A top-up makes it active again.
    assert cli("session", "topup", s.id, "--sats", "100").exit_code == 0
    assert request(cli, s, "hi").exit_code == ExitCode.OK
    assert_store_consistent(db_url)


def test_completed_work_is_charged_up_to_the_balance(cli: CLI, db_url: str, tmp_path: Path) -> None:
    s = open_session(cli, 15)
    verbose = exec_agent(tmp_path, "verbose.py", "print('y' * 4000)")  # 1000 output tokens
    doc = json.loads(request(cli, s, "hi", "--agent", verbose, "--json").stdout)
    assert doc["state"] == "complete"
    assert doc["debitedSats"] == 15 and doc["balanceRemaining"] == 0
    assert balance(db_url, s.id) == ("paused", 0)
    assert_store_consistent(db_url)


def test_session_left_below_fee_plus_one_is_paused(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 22)
    first = json.loads(request(cli, s, "hello", "--json").stdout)  # 2 + 2 tokens: 11 sats
    assert (first["debitedSats"], first["balanceRemaining"]) == (11, 11)
    assert balance(db_url, s.id) == ("active", 11)  # 11 = eval fee + 1: still active
    # 4 tokens of context + 2 in, 2 out: costs 12, minimum 11 <= 11, so served and
    # charged only what is left.
    second = json.loads(request(cli, s, "hello", "--json").stdout)
    assert (second["state"], second["debitedSats"], second["balanceRemaining"]) == (
        "complete",
        11,
        0,
    )
    assert balance(db_url, s.id) == ("paused", 0)
    assert_store_consistent(db_url)


def test_failed_agent_debits_nothing_and_records_the_error(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    s = open_session(cli, 200)
    broken = exec_agent(tmp_path, "broken.py", "sys.stderr.write('model exploded\\n'); sys.exit(3)")
    result = request(cli, s, "hi", "--agent", broken, "--json")
    assert result.exit_code == ExitCode.AGENT_FAILED
    doc = json.loads(result.stdout)
    assert doc["state"] == "failed" and doc["debitedSats"] == 0
    assert "model exploded" in doc["errorMessage"] and "status 3" in doc["errorMessage"]
    assert messages(db_url, s.id)[-1] == (
        "assistant",
        doc["errorMessage"],
        tokens(doc["errorMessage"]),
    )
    assert balance(db_url, s.id) == ("active", 200)
    assert_store_consistent(db_url)


def test_agent_declines_with_exit_10(cli: CLI, db_url: str, tmp_path: Path) -> None:
    s = open_session(cli, 200)
    shy = exec_agent(tmp_path, "shy.py", "print('I cannot help with that'); sys.exit(10)")
    result = request(cli, s, "hi", "--agent", shy, "--json")
    assert result.exit_code == ExitCode.NOT_SERVED
    doc = json.loads(result.stdout)
    assert doc["state"] == "rejected" and doc["reason"] == "I cannot help with that"
    assert doc["debitedSats"] == 0 and balance(db_url, s.id) == ("active", 200)


def test_agent_timeout_is_a_failure(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_AGENT_TIMEOUT", "0.5")
    s = open_session(cli, 200)
    slow = exec_agent(tmp_path, "slow.py", "import time; time.sleep(5)")
    result = request(cli, s, "hi", "--agent", slow, "--json")
    assert result.exit_code == ExitCode.AGENT_FAILED
    assert "timed out" in json.loads(result.stdout)["errorMessage"]


def test_exec_agent_receives_the_context_window(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_CONTEXT_MESSAGES", "3")
    s = open_session(cli, 10_000)
    for n in range(4):
        request(cli, s, f"message {n}")
    spy = exec_agent(
        tmp_path,
        "spy.py",
        "print(json.dumps([m['role'] + ':' + m['content'] for m in conv['messages']]))",
    )
    doc = json.loads(request(cli, s, "last", "--agent", spy, "--json").stdout)
    seen = json.loads(doc["result"])
    assert seen == ["assistant:message 2", "user:message 3", "assistant:message 3", "user:last"]
    assert doc["inputTokens"] == sum(tokens(x.split(":", 1)[1]) for x in seen)


def test_expired_and_awaiting_payment_sessions_serve_nothing(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE sessions SET expires_at = created_at WHERE id = %s", (s.id,))
    before = counts(db_url)
    result = request(cli, s, "hi")
    assert result.exit_code == ExitCode.NOT_SERVED and "expired" in result.stderr
    t = open_session(cli, 200)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute("UPDATE sessions SET state = 'awaiting_payment' WHERE id = %s", (t.id,))
    assert request(cli, t, "hi").exit_code == ExitCode.NOT_SERVED
    assert counts(db_url) == before


def test_each_request_slides_the_expiry(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(
            "UPDATE sessions SET expires_at = now() + interval '1 minute' WHERE id = %s", (s.id,)
        )
    request(cli, s, "hi")
    with psycopg.connect(db_url) as c:
        row = c.execute(
            "SELECT expires_at - now() > interval '23 hours' FROM sessions WHERE id = %s", (s.id,)
        ).fetchone()
    assert row == (True,)


# --- idempotency and batch ---------------------------------------------------------------


def test_idempotent_retry_returns_the_first_outcome(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    first = json.loads(request(cli, s, "pay once", "--idempotency-key", "k-1", "--json").stdout)
    again = json.loads(request(cli, s, "pay once", "--idempotency-key", "k-1", "--json").stdout)
    assert first["replayed"] is False and again["replayed"] is True
    assert again == first | {"replayed": True}
    assert counts(db_url) == (1, 2, 1)
    assert balance(db_url, s.id)[1] == 200 - first["debitedSats"]


def test_idempotency_key_reused_for_another_message_is_refused(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    assert request(cli, s, "first", "--idempotency-key", "k").exit_code == ExitCode.OK
    reused = request(cli, s, "second", "--idempotency-key", "k")
    assert reused.exit_code == ExitCode.BAD_INPUT
    assert "different message" in reused.stderr
    assert counts(db_url) == (1, 2, 1)


def test_batch_of_100(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1_000_000)
    lines = "".join(json.dumps({"message": f"request {n}"}) + "\n" for n in range(100))
    result = request(cli, s, "--batch", input=lines)
    assert result.exit_code == ExitCode.OK, result.stderr
    out = [json.loads(x) for x in result.stdout.splitlines()]
    assert len(out) == 100
    assert [o["result"] for o in out] == [f"request {n}" for n in range(100)]
    assert all(set(o) == OUTCOME_KEYS and o["state"] == "complete" for o in out)
    assert counts(db_url) == (100, 200, 100)
    assert out[-1]["balanceRemaining"] == 1_000_000 - sum(o["debitedSats"] for o in out)
    assert_store_consistent(db_url)


def test_batch_with_idempotency_keys_and_a_malformed_line(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 10_000)
    lines = (
        '{"message": "one", "idempotencyKey": "a"}\n'
        '{"message": "one", "idempotencyKey": "a"}\n'
        "\n"
        '{"message": "two"}\n'
        "{not json\n"
        '{"message": "never"}\n'
    )
    result = request(cli, s, "--batch", input=lines)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "line 5" in result.stderr
    out = [json.loads(x) for x in result.stdout.splitlines()]
    # The bad line gets its own compact NDJSON line, after the outcomes before it.
    assert out[-1]["error"]["line"] == 5 and out[-1]["error"]["exitCode"] == 2
    out = out[:-1]
    assert [o["result"] for o in out] == ["one", "one", "two"]
    assert out[0]["requestId"] == out[1]["requestId"]
    assert [o["replayed"] for o in out] == [False, True, False]
    # summing what was charged over the lines that were not replays counts each debit once
    charged = sum(o["debitedSats"] for o in out if not o["replayed"])
    assert charged == 10_000 - balance(db_url, s.id)[1]
    assert counts(db_url) == (2, 4, 2)


def test_batch_exit_code_is_the_largest_among_lines(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 20)  # the first costs 13 and leaves 7: paused, so the rest are refused
    lines = "".join(json.dumps({"message": "x" * 40}) + "\n" for _ in range(4))
    result = request(cli, s, "--batch", input=lines)
    out = [json.loads(x) for x in result.stdout.splitlines()]
    assert len(out) == 4
    assert out[0]["state"] == "complete"
    assert {o["state"] for o in out[1:]} == {"rejected"}
    assert result.exit_code == ExitCode.NOT_SERVED
    assert_store_consistent(db_url)


@pytest.mark.parametrize(
    "line",
    ['{"message": ""}', '{"message": 5}', "[1, 2]", '{"msg": "x"}', '{"message": "a\\u0000b"}',
     '{"message": "x", "idempotencyKey": 7}'],
)  # fmt: skip
def test_batch_bad_lines_exit_2_with_line_number(cli: CLI, db_url: str, line: str) -> None:
    s = open_session(cli, 1000)
    result = request(cli, s, "--batch", input='{"message": "ok"}\n' + line + "\n")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "line 2" in result.stderr
    assert counts(db_url)[0] == 1
    first, error = result.stdout.splitlines()  # one compact line each, the error's included
    assert json.loads(first)["state"] == "complete"
    assert json.loads(error)["error"]["line"] == 2


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_bad_first_batch_line_is_one_compact_ndjson_line(
    cli: CLI, db_url: str, flags: list[str]
) -> None:
    s = open_session(cli, 1000)
    result = request(cli, s, "--batch", *flags, input='not json\n{"message": "never"}\n')
    assert result.exit_code == ExitCode.BAD_INPUT
    [line] = result.stdout.splitlines()
    assert json.loads(line)["error"] == {
        "message": "line 1: not valid JSON (stopped; before it: 0 complete, 0 rejected, 0 failed)",
        "exitCode": 2,
        "line": 1,
    }
    assert counts(db_url)[0] == 0


# --- bad input and authorization write nothing ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (["   "], None),
        ([""], None),
        (["-"], b"\xff\xfe invalid utf-8"),
        (["a\x00b"], None),
        (["x" * 33], None),
    ],
)
def test_bad_messages_write_nothing(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch, args: list[str], stdin: bytes | None
) -> None:
    monkeypatch.setenv("TOWER_MAX_MESSAGE_CHARS", "32")
    s = open_session(cli, 200)
    result = request(cli, s, *args, input=stdin)
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
    assert counts(db_url) == (0, 0, 0)
    assert balance(db_url, s.id) == ("active", 200)


def test_message_from_stdin(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    result = request(cli, s, "-", input="multi\nline ünïcode\n")
    assert result.stdout == "multi\nline ünïcode\n"
    assert messages(db_url, s.id)[0][1] == "multi\nline ünïcode"


def test_sql_looking_text_is_stored_verbatim(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    evil = "'); DROP TABLE session_messages; -- $$ \\ %s %(x)s"
    assert request(cli, s, evil).stdout == evil + "\n"
    assert messages(db_url, s.id)[0][1] == evil


def test_authorization(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    other = open_session(cli, 200)
    read_only = cli("macaroon", "attenuate", s.macaroon, "--scope", "read").stdout.strip()
    for token in ("", "garbage", read_only, other.macaroon):
        result = cli("session", "request", s.id, "hi", "--macaroon", token)
        assert result.exit_code == ExitCode.UNAUTHORIZED, token
    assert counts(db_url) == (0, 0, 0)


def test_macaroon_from_file_and_env(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_session(cli, 200)
    token_file = tmp_path / "token"
    token_file.write_text(s.macaroon + "\n")
    assert cli("session", "request", s.id, "hi", "--macaroon-file", str(token_file)).exit_code == 0
    monkeypatch.setenv("TOWER_MACAROON", s.macaroon)
    assert cli("session", "request", s.id, "hi").exit_code == 0


def test_unknown_agent_and_missing_program_exit_2(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 200)
    assert request(cli, s, "hi", "--agent", "gpt").exit_code == ExitCode.BAD_INPUT
    assert request(cli, s, "hi", "--agent", "exec:/no/such/agent").exit_code == ExitCode.BAD_INPUT
    assert request(cli, s, "hi", "--agent", "openai:ftp://x").exit_code == ExitCode.BAD_INPUT
    assert counts(db_url) == (0, 0, 0)


# --- the openai: backend against a real HTTP server on 127.0.0.1 -----------------------------


def test_openai_success_uses_reported_usage(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_OPENAI_API_KEY", "sk-test-secret")
    s = open_session(cli, 1000)
    usage = {"prompt_tokens": 30, "completion_tokens": 70}
    with openai_server({"reply": "Bonjour", "usage": usage}) as (url, received):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--model", "m-1", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["result"] == "Bonjour"
    assert (doc["inputTokens"], doc["outputTokens"]) == (30, 70)
    assert doc["debitedSats"] == cost_sats(Pricing(), 30, 70)
    [sent] = received
    assert sent["model"] == "m-1" and sent["_path"] == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "user", "content": "hello"}]
    assert sent["_auth"] == "Bearer sk-test-secret"
    assert "sk-test-secret" not in result.stdout + result.stderr


def test_openai_http_500_is_a_failure(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    with openai_server({"status": 500, "body": {"error": "boom"}}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert result.exit_code == ExitCode.AGENT_FAILED
    doc = json.loads(result.stdout)
    assert "HTTP 500" in doc["errorMessage"] and doc["debitedSats"] == 0
    assert_store_consistent(db_url)


def test_openai_timeout_is_a_failure(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_AGENT_TIMEOUT", "0.5")
    s = open_session(cli, 1000)
    with openai_server({"delay": 2}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert result.exit_code == ExitCode.AGENT_FAILED
    assert "timed out" in json.loads(result.stdout)["errorMessage"]


def test_openai_refusal_is_a_rejection(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    body = {"choices": [{"message": {"role": "assistant", "content": None, "refusal": "No."}}]}
    with openai_server({"body": body}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}", "--json")
    assert result.exit_code == ExitCode.NOT_SERVED
    assert json.loads(result.stdout)["reason"] == "No."


def test_openai_unreachable_is_a_failure(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    result = request(cli, s, "hello", "--agent", "openai:http://127.0.0.1:1/v1", "--json")
    assert result.exit_code == ExitCode.AGENT_FAILED


# --- agents that misbehave --------------------------------------------------------------


def test_agent_output_with_nul_is_stored_cleaned(cli: CLI, db_url: str, tmp_path: Path) -> None:
    s = open_session(cli, 500)
    nul = exec_agent(tmp_path, "nul.py", "sys.stdout.write('answer\\x00tail')")
    result = request(cli, s, "hi", "--agent", nul, "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["result"] == "answer\ufffdtail"
    broken = exec_agent(tmp_path, "nulerr.py", "sys.stderr.write('bad\\x00thing'); sys.exit(2)")
    failed = request(cli, s, "hi", "--agent", broken, "--json")
    assert failed.exit_code == ExitCode.AGENT_FAILED
    assert "bad\ufffdthing" in json.loads(failed.stdout)["errorMessage"]
    assert_store_consistent(db_url)


def test_zero_reported_output_for_a_long_reply_is_not_free(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 10_000)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    with openai_server({"reply": "z" * 20_000, "usage": usage}) as (url, _):
        doc = json.loads(request(cli, s, "hello", "--agent", f"openai:{url}", "--json").stdout)
    assert doc["outputTokens"] == 5000
    assert doc["debitedSats"] == cost_sats(Pricing(), 2, 5000)


def test_exec_agents_do_not_see_towerctl_secrets(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    monkeypatch.setenv("PGPASSWORD", "pg-should-not-leak")
    s = open_session(cli, 500)
    monkeypatch.setenv("TOWER_MACAROON", s.macaroon)
    snoop = exec_agent(tmp_path, "env.py", "import os; print(' '.join(sorted(os.environ)))")
    seen = json.loads(request(cli, s, "hi", "--agent", snoop, "--json").stdout)["result"].split()
    assert "PATH" in seen
    assert not [k for k in seen if k.startswith("TOWER_")]
    assert "OPENAI_API_KEY" not in seen and "PGPASSWORD" not in seen


def test_bad_openai_urls_exit_2(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 500)
    for url in ("openai:http://[::1", "openai:http://", "openai:nope"):
        assert request(cli, s, "hi", "--agent", url).exit_code == ExitCode.BAD_INPUT, url
    assert counts(db_url) == (0, 0, 0)


def test_session_expiring_while_the_agent_runs_stays_expired(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    s = open_session(cli, 500)
    with psycopg.connect(db_url, autocommit=True) as c:
        c.execute(
            "UPDATE sessions SET expires_at = now() + interval '1 second' WHERE id = %s", (s.id,)
        )
    slow = exec_agent(
        tmp_path, "slow.py", "import time; time.sleep(1.5); print(conv['messages'][-1]['content'])"
    )
    result = request(cli, s, "hi", "--agent", slow, "--json")
    assert result.exit_code == ExitCode.OK
    cli("session", "list")  # applies the expiry
    with psycopg.connect(db_url) as c:
        row = c.execute(
            "SELECT state, expires_at < now() FROM sessions WHERE id = %s", (s.id,)
        ).fetchone()
    assert row == ("expired", True)
    assert_store_consistent(db_url)


def test_batch_exit_code_counts_failed_lines_before_a_malformed_one(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    s = open_session(cli, 500)
    broken = exec_agent(tmp_path, "broken.py", "sys.exit(3)")
    lines = '{"message": "a"}\n{"message": "b"}\nnot json\n'
    result = request(cli, s, "--batch", "--agent", broken, input=lines)
    assert result.exit_code == ExitCode.AGENT_FAILED
    assert "line 3" in result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o.get("state") for o in out[:2]] == ["failed", "failed"]
    assert out[2]["error"]["line"] == 3 and len(out) == 3


def test_batch_line_with_invalid_utf8_exits_2_with_its_number(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 500)
    result = request(cli, s, "--batch", input=b'{"message": "ok"}\n{"message": "\xff"}\n')
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "line 2" in result.stderr and "UTF-8" in result.stderr
    assert counts(db_url)[0] == 1


# --- a batch keeps its lease between lines (migration 0012) ------------------------------

TOWERCTL = [sys.executable, "-m", "towerctl"]


def lease_columns(url: str, session_id: str) -> tuple[object, ...]:
    with psycopg.connect(direct(url), autocommit=True) as c:
        row = c.execute(
            "SELECT lease_owner, lease_until FROM sessions WHERE id = %s", (session_id,)
        ).fetchone()
    assert row is not None
    return tuple(row)


def spawn_batch(s: OpenedSession, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TOWERCTL, "session", "request", s.id, "--batch", "--macaroon", s.macaroon],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )


@pytest.mark.timeout(60)
def test_a_batch_gives_its_kept_lease_back_however_it_ends(
    cli: CLI, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_session(cli, 10_000)
    done = request(cli, s, "--batch", input='{"message": "one"}\n{"message": "two"}\n')
    assert done.exit_code == ExitCode.OK, done.stderr
    assert lease_columns(db_url, s.id) == (None, None)
    stopped = request(cli, s, "--batch", input='{"message": "three"}\n{not json\n')
    assert stopped.exit_code == ExitCode.BAD_INPUT
    assert lease_columns(db_url, s.id) == (None, None)
    # ...so a request right after it is served at once, with no busy wait at all
    monkeypatch.setenv("TOWER_BUSY_WAIT", "0")
    after = request(cli, s, "now")
    assert after.exit_code == ExitCode.OK, after.stderr


@pytest.mark.timeout(120)
def test_a_waiter_is_served_between_the_lines_of_a_batch_that_never_pauses(
    cli: CLI, db_url: str, tower_env: dict[str, str]
) -> None:
    """The batch keeps its lease from line to line, but not when another request has asked
    for it: the waiter is served while the batch is still being fed, not after it."""
    s = open_session(cli, 100_000_000)
    batch = spawn_batch(s, tower_env)
    assert batch.stdin is not None and batch.stdout is not None
    stop = threading.Event()
    answered: list[int] = []

    def feed() -> None:
        assert batch.stdin is not None
        n = 0
        with contextlib.suppress(BrokenPipeError, ValueError):
            while not stop.is_set():
                chunk = "".join(json.dumps({"message": f"batch {n + i}"}) + "\n" for i in range(20))
                n += 20
                batch.stdin.write(chunk)
                batch.stdin.flush()
            batch.stdin.close()

    def read() -> None:
        assert batch.stdout is not None
        for line in batch.stdout:
            answered.append(json.loads(line)["requestId"])

    threads = [threading.Thread(target=f, daemon=True) for f in (feed, read)]
    for thread in threads:
        thread.start()
    try:
        wait_until = time.monotonic() + 30
        while not answered and time.monotonic() < wait_until:  # the batch runs
            time.sleep(0.05)
        assert answered, "the batch answered nothing"
        waiter = subprocess.run(
            [*TOWERCTL, "session", "request", s.id, "waiter", "--json", "--macaroon", s.macaroon],
            env={**os.environ, **tower_env, "TOWER_BUSY_WAIT": "20"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert batch.poll() is None, "the batch was still being fed"
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        batch.stdin = None  # closed by the feeder
        _out, err = batch.communicate(timeout=60)
    assert waiter.returncode == ExitCode.OK, waiter.stderr
    assert batch.returncode == ExitCode.OK, err
    served = json.loads(waiter.stdout)["requestId"]
    assert max(answered) > served  # batch lines ran after the waiter's request
    assert lease_columns(db_url, s.id) == (None, None)
    assert_store_consistent(db_url)


@pytest.mark.timeout(120)
def test_a_batch_idle_past_its_kept_lease_takes_the_session_again(
    cli: CLI, db_url: str, tower_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that waits on its input longer than the lease it kept does not trust it:
    another request may have run meanwhile, so it takes the lease (and history) again."""
    s = open_session(cli, 100_000)
    batch = spawn_batch(s, tower_env)
    assert batch.stdin is not None and batch.stdout is not None
    try:
        batch.stdin.write('{"message": "first"}\n')
        batch.stdin.flush()
        assert json.loads(batch.stdout.readline())["state"] == "complete"
        # The batch now idles holding a kept lease (echo: 5 s); this request waits it out.
        monkeypatch.setenv("TOWER_BUSY_WAIT", "30")
        between = request(cli, s, "between")
        assert between.exit_code == ExitCode.OK, between.stderr
        batch.stdin.write('{"message": "second"}\n')
        batch.stdin.close()
        batch.stdin = None
        second = json.loads(batch.stdout.readline())
    finally:
        _out, err = batch.communicate(timeout=60)
    assert batch.returncode == ExitCode.OK, err
    assert second["state"] == "complete" and second["requestId"] is not None, second
    # its context held the request that ran between (the history was read again)
    assert second["inputTokens"] == sum(tokens(t) for t in ["first"] * 2 + ["between"] * 2) + 2
    assert [m[1] for m in messages(db_url, s.id)] == ["first"] * 2 + ["between"] * 2 + [
        "second"
    ] * 2
    assert lease_columns(db_url, s.id) == (None, None)
    assert_store_consistent(db_url)


@pytest.mark.parametrize("token_flag", ["--macaroon", "--macaroon-file"])
@pytest.mark.parametrize("stdin_use", [["-"], [], ["--batch"]])
def test_stdin_holds_either_the_macaroon_or_the_request(
    cli: CLI, token_flag: str, stdin_use: list[str]
) -> None:
    """`--macaroon -` and a message read from stdin would both take stdin: refused, and
    nothing runs (the first batch line never becomes the token)."""
    session = open_session(cli)
    done = cli("session", "request", session.id, *stdin_use, token_flag, "-",
               input=session.macaroon + '\n{"message": "hi"}\n')  # fmt: skip
    assert done.exit_code == ExitCode.BAD_INPUT
    assert "stdin cannot carry both" in done.stderr
    shown = cli("session", "messages", session.id, "--json", "--macaroon", session.macaroon)
    assert json.loads(shown.stdout)["messages"] == []
