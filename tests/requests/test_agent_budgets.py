"""The budget (SPEC 6, 15): every agent is told the most output tokens the balance buys
after the minimum cost, output past it is cut (`"truncated": true`), a completed
request is charged its whole cost and that never exceeds the balance; an empty or
null reply is failed and charged nothing."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents_fixtures import exec_agent, openai_server
from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from towerctl.config import Pricing
from towerctl.errors import ExitCode
from towerctl.requests.rules import cost_sats, output_budget

# The env-settable rates, as a person would write them (whole, or with a few decimals).
FEES = st.integers(min_value=0, max_value=50)
RATES = st.decimals(min_value=0, max_value=2000, places=2).map(str)
MARGINS = st.decimals(min_value=0, max_value=5, places=3).map(str)
SLOW = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def request(cli: CLI, s: OpenedSession, *args: str):  # type: ignore[no-untyped-def]
    return cli("session", "request", s.id, *args, "--macaroon", s.macaroon, "--json")


def last_request(url: str) -> tuple[str, int, int, int, int] | None:
    """(state, cost, debited, balance after, output tokens) of the newest request."""
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT state, cost_sats, debited_sats, balance_after_sats, output_tokens "
            "FROM session_requests ORDER BY id DESC LIMIT 1"
        ).fetchone()
    return row


def pricing(fee: int, rate: str, margin: str) -> Pricing:
    return Pricing(eval_fee_sats=fee, sats_per_1k_tokens=float(rate), margin=float(margin))


@given(
    balance=st.integers(min_value=0, max_value=5000),
    input_tokens=st.integers(min_value=0, max_value=3000),
    fee=FEES,
    rate=RATES,
    margin=MARGINS,
)
def test_the_budget_is_the_cost_formula_inverted(
    balance: int, input_tokens: int, fee: int, rate: str, margin: str
) -> None:
    prices = pricing(fee, rate, margin)
    most = 100_000
    budget = output_budget(prices, balance, input_tokens, most)
    assert 0 <= budget <= most
    if cost_sats(prices, input_tokens, 0) > balance:
        assert budget == 0
        return
    assert cost_sats(prices, input_tokens, budget) <= balance
    assert budget == most or cost_sats(prices, input_tokens, budget + 1) > balance


def test_the_budget_at_the_defaults_by_hand() -> None:
    # 10 + ceil((1 + out) x 0.14) <= 15  <=>  1 + out <= 35.71...  <=>  out <= 34
    assert output_budget(Pricing(), 15, 1) == 34
    assert cost_sats(Pricing(), 1, 34) == 15 and cost_sats(Pricing(), 1, 35) == 16
    assert output_budget(Pricing(), 10, 1) == 0  # below the minimum cost (11)
    # exact where decimal rounding would not be: rate 0.3 x margin 1/3 = 0.1 per 1k
    assert output_budget(pricing(0, "0.3", str(Decimal(1) / 3)), 1, 0) >= 0


@SLOW
@given(
    balance=st.integers(min_value=1, max_value=3000),
    fee=st.integers(min_value=0, max_value=20),
    rate=st.sampled_from(["100", "37.5", "250", "1"]),
    margin=st.sampled_from(["1.4", "1", "2.25"]),
)
def test_openai_is_told_its_budget_and_cut_there(
    cli: CLI,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    balance: int,
    fee: int,
    rate: str,
    margin: str,
) -> None:
    """The server ignores max_tokens and sends 20,000 characters (5,000 tokens)."""
    for name, value in (
        ("TOWER_EVAL_FEE_SATS", str(fee)),
        ("TOWER_SATS_PER_1K_TOKENS", rate),
        ("TOWER_MARGIN", margin),
    ):
        monkeypatch.setenv(name, value)
    prices = pricing(fee, rate, margin)
    s = open_session(cli, balance)
    reply = "w" * 20_000
    with openai_server({"reply": reply}) as (url, received):
        result = request(cli, s, "hello", "--agent", f"openai:{url}")
    doc = json.loads(result.stdout)
    budget = output_budget(prices, balance, 2, 50_000)  # "hello": 2 tokens
    if budget == 0:
        assert result.exit_code == ExitCode.NOT_SERVED and received == []
        assert doc["debitedSats"] == 0
        return
    assert result.exit_code == ExitCode.OK, result.stderr
    [sent] = received
    assert sent["max_tokens"] == sent["max_completion_tokens"] == budget
    assert doc["state"] == "complete"
    assert doc["result"] == reply[: budget * 4] and doc["outputTokens"] <= budget
    assert doc["truncated"] is (budget < 5000)
    assert doc["debitedSats"] <= balance
    assert doc["debitedSats"] == cost_sats(prices, doc["inputTokens"], doc["outputTokens"])
    state, cost, debited, after, _ = last_request(db_url) or ("", 0, 0, 0, 0)
    assert (state, debited, after) == ("complete", doc["debitedSats"], balance - debited)
    assert cost == debited  # never charged less than its cost
    assert_store_consistent(db_url)


@SLOW
@given(balance=st.integers(min_value=1, max_value=3000))
def test_exec_is_told_its_budget_and_cut_there(
    cli: CLI, db_url: str, tmp_path: Path, balance: int
) -> None:
    told = tmp_path / "told.txt"
    told.unlink(missing_ok=True)
    agent = exec_agent(
        tmp_path,
        "verbose.py",
        f"open({str(told)!r}, 'w').write(str(conv.get('maxOutputTokens')))\nprint('y' * 20000)",
    )
    s = open_session(cli, balance)
    result = request(cli, s, "hello", "--agent", agent)
    doc = json.loads(result.stdout)
    budget = output_budget(Pricing(), balance, 2, 50_000)
    if budget == 0:
        assert result.exit_code == ExitCode.NOT_SERVED and not told.exists()
        return
    assert result.exit_code == ExitCode.OK, result.stderr
    assert told.read_text() == str(budget)
    assert doc["result"] == "y" * min(20_000, budget * 4)
    assert doc["truncated"] is (budget < 5000)
    assert doc["debitedSats"] == cost_sats(Pricing(), 2, doc["outputTokens"]) <= balance
    state, cost, debited, _, out = last_request(db_url) or ("", 0, 0, 0, 0)
    assert (state, cost, debited, out) == (
        "complete",
        debited,
        doc["debitedSats"],
        min(5000, budget),
    )


def test_exec_agent_writing_past_its_budget_is_cut(cli: CLI, db_url: str, tmp_path: Path) -> None:
    """100,000 characters (within the reply bound) for a budget of 34 tokens: the reply
    is cut at the budget, complete, charged the whole balance and no more."""
    agent = exec_agent(tmp_path, "flood.py", "sys.stdout.write('z' * 100_000)")
    s = open_session(cli, 15)
    doc = json.loads(request(cli, s, "hi", "--agent", agent).stdout)
    assert (doc["state"], doc["result"], doc["truncated"]) == ("complete", "z" * 136, True)
    assert doc["debitedSats"] == 15 and doc["balanceRemaining"] == 0
    assert_store_consistent(db_url)


def test_a_reply_within_the_budget_is_not_truncated(cli: CLI, db_url: str) -> None:
    s = open_session(cli, 1000)
    doc = json.loads(request(cli, s, "hello").stdout)
    assert (doc["state"], doc["result"], doc["truncated"]) == ("complete", "hello", False)


def test_a_zero_token_budget_is_refused(cli: CLI, db_url: str) -> None:
    """Minimum cost 11 sats <= balance 11, but the 11 sats buy no output token:
    refused as a minimum beyond the balance is (rejected, nothing debited, paused)."""
    s = open_session(cli, 11)
    message = "m" * 28  # 7 tokens: 10 + ceil(7 x 0.14) = 11; 8 tokens would cost 12
    result = request(cli, s, message)
    assert result.exit_code == ExitCode.NOT_SERVED
    doc = json.loads(result.stdout)
    assert doc["state"] == "rejected" and doc["debitedSats"] == 0
    assert "buys no output" in doc["reason"]
    assert_store_consistent(db_url)


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": ""},
        {"role": "assistant"},
    ],
)
def test_openai_null_or_empty_content_is_failed_and_free(
    cli: CLI, db_url: str, message: dict[str, object]
) -> None:
    s = open_session(cli, 1000)
    body = {"choices": [{"message": message}], "usage": {"completion_tokens": 40}}
    with openai_server({"body": body}) as (url, _):
        result = request(cli, s, "hello", "--agent", f"openai:{url}")
    assert result.exit_code == ExitCode.AGENT_FAILED
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["debitedSats"], doc["balanceRemaining"]) == ("failed", 0, 1000)
    assert "empty" in doc["errorMessage"]
    assert_store_consistent(db_url)


def test_exec_empty_output_is_failed_and_free(cli: CLI, db_url: str, tmp_path: Path) -> None:
    agent = exec_agent(tmp_path, "mute.py", "print()")
    s = open_session(cli, 1000)
    result = request(cli, s, "hello", "--agent", agent)
    assert result.exit_code == ExitCode.AGENT_FAILED
    assert json.loads(result.stdout)["debitedSats"] == 0


def test_reported_usage_beyond_the_budget_is_not_charged_past_the_balance(
    cli: CLI, db_url: str
) -> None:
    """A server that claims 9,000 prompt and 9,000 completion tokens: the charge stays
    within the balance, and is the whole of the recorded cost."""
    s = open_session(cli, 40)
    usage = {"prompt_tokens": 9000, "completion_tokens": 9000}
    with openai_server({"reply": "short", "usage": usage}) as (url, _):
        doc = json.loads(request(cli, s, "hello", "--agent", f"openai:{url}").stdout)
    assert doc["state"] == "complete" and doc["debitedSats"] <= 40
    assert doc["debitedSats"] == cost_sats(Pricing(), doc["inputTokens"], doc["outputTokens"])
    assert_store_consistent(db_url)


def test_batch_lines_say_truncated_and_never_overspend(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    """Each line's budget is what the balance left by the lines before it buys."""
    agent = exec_agent(tmp_path, "long.py", "print('q' * 400)")  # 100 tokens
    s = open_session(cli, 60)
    lines = "".join(json.dumps({"message": f"line {n}"}) + "\n" for n in range(4))
    result = cli(
        "session", "request", s.id, "--batch", "--agent", agent, "--macaroon", s.macaroon,
        input=lines,
    )  # fmt: skip
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [d["state"] for d in docs][:2] == ["complete", "complete"]
    assert docs[0]["truncated"] is False and docs[1]["truncated"] is True
    balance = 60
    for d in docs:
        assert d["debitedSats"] <= balance
        if d["state"] == "complete":
            assert d["debitedSats"] == cost_sats(Pricing(), d["inputTokens"], d["outputTokens"])
        balance -= d["debitedSats"]
    assert balance >= 0
    assert_store_consistent(db_url)
