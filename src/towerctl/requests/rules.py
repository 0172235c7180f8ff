"""The pure rules of a session request (SPEC 6): tokens, cost, the context window,
what a message and an idempotency key may be, and the reply as stored.

No database here: these are the formulas that the request service, the tests and
the benchmark share.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import replace
from decimal import ROUND_CEILING, Decimal
from fractions import Fraction
from typing import IO

from towerctl import bounds
from towerctl.agents import AgentReply, ChatMessage, clean
from towerctl.config import Pricing, RequestLimits
from towerctl.errors import BadInput

MAX_IDEMPOTENCY_KEY = int(bounds.IDEMPOTENCY_KEY_CHARS.default)
MAX_REPORTED_TOKENS = int(bounds.REPORTED_TOKENS.default)


def tokens(text: str) -> int:
    """The token estimate of SPEC 6: ceil(characters / 4)."""
    return math.ceil(len(text) / 4)


def cost_sats(pricing: Pricing, input_tokens: int, output_tokens: int) -> int:
    """eval fee + ceil((input + output) x sats per 1k / 1000 x margin), in exact decimals."""
    variable = (
        Decimal(input_tokens + output_tokens)
        * Decimal(str(pricing.sats_per_1k_tokens))
        / Decimal(1000)
        * Decimal(str(pricing.margin))
    )
    return pricing.eval_fee_sats + int(variable.to_integral_value(rounding=ROUND_CEILING))


def output_budget(
    pricing: Pricing, balance: int, input_tokens: int, most: int = MAX_REPORTED_TOKENS
) -> int:
    """The most output tokens the balance buys after the minimum cost (SPEC 6): the
    largest `out` with cost_sats(input, out) <= balance, at most `most` (a free price
    buys without end); 0 when even no output is more than the balance.

    eval fee + ceil(x) <= balance  <=>  x <= balance - eval fee (an integer), with
    x = (input + out) x rate, so out = floor((balance - fee) / rate) - input, exact in
    fractions (the decimal cost is exact too)."""
    room = balance - pricing.eval_fee_sats
    if room < 0:
        return 0
    rate = (
        Fraction(Decimal(str(pricing.sats_per_1k_tokens)))
        * Fraction(Decimal(str(pricing.margin)))
        / 1000
    )
    if rate == 0:
        return most
    budget = max(0, min(most, math.floor(room / rate) - input_tokens))
    while budget > 0 and cost_sats(pricing, input_tokens, budget) > balance:
        budget -= 1  # never reached while the two are exact; kept as the rule's guard
    return budget


def cut_to_budget(text: str, budget: int) -> tuple[str, bool]:
    """The reply as served: no more than `budget` tokens as counted here (ceil(chars/4)),
    so at most budget x 4 characters; and whether anything was cut."""
    if tokens(text) <= budget:
        return text, False
    return text[: budget * 4], True


def context_window(
    newest_first: Sequence[tuple[str, str, int]], limits: RequestLimits
) -> list[ChatMessage]:
    """The last N messages within the token budget, oldest dropped first; oldest first out."""
    chosen = list(newest_first[: limits.context_messages])
    chosen.reverse()
    total = sum(t for _, _, t in chosen)
    while chosen and total > limits.context_tokens:
        total -= chosen.pop(0)[2]
    return [ChatMessage(role, content) for role, content, _ in chosen]


def plausible(reported: int | None, estimate: int) -> int:
    """An agent's reported token count, unless it is missing or implausible (negative,
    beyond any context window, or zero for a non-empty text): then our own estimate."""
    if reported is None or not 0 <= reported <= MAX_REPORTED_TOKENS:
        return estimate
    if reported == 0 and estimate > 0:
        return estimate
    return reported


def bounded_reply(reply: AgentReply, limits: RequestLimits) -> AgentReply:
    """The agent's reply as stored: cleaned, and `failed` when a result or reason is
    longer than the reply bound (a failed request charges nothing); an error message
    is cut to its own bound."""
    if reply.state == "failed":
        reply = replace(reply, text=reply.text[: bounds.ERROR_MESSAGE_CHARS])
    elif len(reply.text) > limits.max_reply_chars:
        return AgentReply(
            "failed",
            f"agent's reply has {len(reply.text):,} characters; the maximum is "
            f"{limits.max_reply_chars:,} (TOWER_MAX_REPLY_CHARS)",
        )
    return replace(reply, text=clean(reply.text))


def read_message(stream: IO[bytes], limits: RequestLimits) -> str:
    """The message on a binary stream (stdin), read up to its byte bound and no further;
    one trailing newline is dropped. Past the bound: BadInput, nothing read beyond it."""
    cap = limits.message_stdin_bytes
    raw = bounds.read_at_most(stream, cap)
    if len(raw) > cap:
        raise BadInput(
            f"the message on stdin is longer than {cap:,} bytes; the maximum is "
            f"{limits.max_message_chars:,} characters (TOWER_MAX_MESSAGE_CHARS)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("the message on stdin is not valid UTF-8") from None
    return text[:-1] if text.endswith("\n") else text


def validate_message(message: str, limits: RequestLimits) -> str:
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("the message is not valid UTF-8") from None
    if "\x00" in message:
        raise BadInput("the message contains a NUL character")
    if not message.strip():
        raise BadInput("the message is empty")
    if len(message) > limits.max_message_chars:
        raise BadInput(
            f"the message has {len(message):,} characters; the maximum is "
            f"{limits.max_message_chars:,} (TOWER_MAX_MESSAGE_CHARS)"
        )
    return message


def validate_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or "\x00" in key:
        raise BadInput(f"idempotency keys are 1 to {MAX_IDEMPOTENCY_KEY} characters without NUL")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput("the idempotency key is not valid UTF-8") from None
    return key


def message_digest(message: str) -> str:
    return hashlib.sha256(message.encode("utf-8")).hexdigest()
