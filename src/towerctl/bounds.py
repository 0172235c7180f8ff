"""Every bound on what towerctl reads, in one place (SPEC 11 "Bounded input").

Each bound has a name, a default, the environment variable that changes it (if
any) and, for environment numbers, the range the variable may take. Past a bound
towerctl exits 2 with nothing written, or, when the input is an agent's reply,
records the request `failed` (exit 6); never a memory error, never exit 1.

The readers here stop reading at the bound: a stream of endless bytes
(`/dev/zero`) costs at most the bound in memory and never more.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO

from towerctl.errors import BadInput


@dataclass(frozen=True)
class Bound:
    """One input bound. `env` names the variable that sets it; `minimum` and
    `maximum` are the range that variable may take."""

    name: str
    default: float
    unit: str
    env: str | None = None
    minimum: float = 0
    maximum: float = 0
    whole: bool = True
    past: str = "exit 2, nothing written"

    def value(self) -> float:
        """The bound in force: the environment variable when it is set, else the default."""
        if self.env is None:
            return self.default
        return env_number(self.env, self.default, self.minimum, self.maximum, whole=self.whole)

    def whole_value(self) -> int:
        return int(self.value())


# --- bounds on what a person or a script gives towerctl -------------------------------

TOKEN_BYTES = Bound("macaroon token", 64 * 1024, "bytes")
MESSAGE_CHARS = Bound(
    "message", 32_000, "characters", "TOWER_MAX_MESSAGE_CHARS", minimum=1, maximum=1_000_000
)
# JSON may write one character as up to 12 bytes (a surrogate pair of \uXXXX escapes):
# a batch line is bounded by what the longest valid message needs, plus room for a key.
BATCH_LINE_OVERHEAD_BYTES = 4_096
JSON_DEPTH = Bound("JSON nesting depth (batch line, agent reply)", 64, "levels")
IDEMPOTENCY_KEY_CHARS = Bound("idempotency key", 200, "characters")

# --- bounds on what an agent gives back ---------------------------------------------

REPLY_CHARS = Bound(
    "agent reply",
    200_000,
    "characters",
    "TOWER_MAX_REPLY_CHARS",
    minimum=1,
    maximum=2_000_000,
    past="the request is recorded failed (exit 6), nothing charged",
)
AGENT_SECONDS = Bound(
    "agent deadline (the whole call)",
    60.0,
    "seconds",
    "TOWER_AGENT_TIMEOUT",
    minimum=0.001,
    maximum=3_600,
    whole=False,
    past="the agent is stopped, the request recorded failed (exit 6)",
)
# An HTTP body may escape every character (12 bytes) and wrap it in an envelope.
HTTP_BODY_OVERHEAD_BYTES = 64 * 1024
AGENT_ERROR_CHARS = 500  # the tail of an agent's stderr or HTTP error body kept as its error
ERROR_MESSAGE_CHARS = 1_000  # a failed request's error message, as stored
REPORTED_TOKENS = Bound(
    "reported token usage", 10_000_000, "tokens", past="the request is recorded failed (exit 6)"
)

# --- environment numbers (money, context, waits) ---------------------------------------

EVAL_FEE_SATS = Bound("eval fee", 10, "sats", "TOWER_EVAL_FEE_SATS", minimum=0, maximum=100_000_000)
SATS_PER_1K_TOKENS = Bound(
    "price per 1k tokens",
    100.0,
    "sats",
    "TOWER_SATS_PER_1K_TOKENS",
    minimum=0,
    maximum=1_000_000,
    whole=False,
)
MARGIN = Bound("margin", 1.4, "factor", "TOWER_MARGIN", minimum=0, maximum=1_000, whole=False)
CONTEXT_MESSAGES = Bound(
    "context messages", 8, "messages", "TOWER_CONTEXT_MESSAGES", minimum=0, maximum=1_000
)
CONTEXT_TOKENS = Bound(
    "context tokens", 4_000, "tokens", "TOWER_CONTEXT_TOKENS", minimum=0, maximum=1_000_000
)
BUSY_WAIT_SECONDS = Bound(
    "busy wait", 30.0, "seconds", "TOWER_BUSY_WAIT", minimum=0, maximum=3_600, whole=False
)

READ_MAX_LAG = Bound(
    "read replica lag",
    30.0,
    "seconds",
    "TOWER_READ_MAX_LAG",
    minimum=0,
    maximum=86_400,
    whole=False,
    past="reads from the replica are refused (exit 8): retry, or read from the primary",
)


ALL: tuple[Bound, ...] = (
    TOKEN_BYTES,
    MESSAGE_CHARS,
    JSON_DEPTH,
    IDEMPOTENCY_KEY_CHARS,
    REPLY_CHARS,
    AGENT_SECONDS,
    REPORTED_TOKENS,
    EVAL_FEE_SATS,
    SATS_PER_1K_TOKENS,
    MARGIN,
    CONTEXT_MESSAGES,
    CONTEXT_TOKENS,
    BUSY_WAIT_SECONDS,
    READ_MAX_LAG,
)


def message_stdin_bytes(max_chars: int) -> int:
    """The most bytes read from stdin for one message: every character may take 4 bytes
    in UTF-8, plus the one byte that shows the message is too long."""
    return 4 * max_chars + 1


def batch_line_bytes(max_chars: int) -> int:
    """The longest batch line read (without its newline)."""
    return 12 * max_chars + BATCH_LINE_OVERHEAD_BYTES


def reply_output_bytes(max_chars: int) -> int:
    """The most bytes read from an exec agent's stdout."""
    return 4 * max_chars + 1


def http_body_bytes(max_chars: int) -> int:
    """The most (decompressed) bytes read of an HTTP agent's response body."""
    return 12 * max_chars + HTTP_BODY_OVERHEAD_BYTES


# --- environment numbers -----------------------------------------------------------------


def _shown(value: float, whole: bool) -> str:
    return f"{int(value):,}" if whole or value == int(value) else f"{value:g}"


_ASCII_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def env_number(name: str, default: float, minimum: float, maximum: float, *, whole: bool) -> float:
    """The number in environment variable `name`, or `default` when it is unset or blank.

    Anything but a finite number within [minimum, maximum] (a whole one when `whole`)
    is refused with one line naming the variable and the range."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    kind = "a whole number" if whole else "a number"
    allowed = f"{name} must be {kind} from {_shown(minimum, whole)} to {_shown(maximum, whole)}"
    if not _ASCII_NUMBER.fullmatch(raw.strip()):  # float() takes other digits and 1_000 too
        raise BadInput(f"{allowed}, got {raw[:40]!r}")
    try:
        value = float(raw[:64])
    except ValueError:
        raise BadInput(f"{allowed}, got {raw[:40]!r}") from None
    if len(raw) > 64 or not minimum <= value <= maximum:  # NaN and infinities fail here too
        raise BadInput(f"{allowed}, got {raw[:40]!r}")
    if whole and value != int(value):
        raise BadInput(f"{allowed}, got {raw[:40]!r}")
    return int(value) if whole else value


# --- bounded readers -----------------------------------------------------------------------


def read_at_most(stream: IO[bytes], limit: int) -> bytes:
    """Up to `limit` bytes of `stream` (to its end, or `limit + 1` bytes when it holds
    more, so the caller can tell). Never reads further, whatever the stream holds."""
    chunks: list[bytes] = []
    wanted = limit + 1
    while wanted > 0:
        chunk = stream.read(min(wanted, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        wanted -= len(chunk)
    return b"".join(chunks)


class LineTooLong(Exception):
    """A line longer than its bound; the rest of it was skipped."""


class BoundedLines:
    """The lines of a binary stream, each read with at most `limit` bytes (plus its
    newline) held. A longer line raises `LineTooLong` and nothing more of the stream
    is read (an endless line, `/dev/zero`, is never read to its end)."""

    CHUNK = 1 << 16

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream, self.limit = stream, limit
        self._held = bytearray()
        self._ended = False

    def __iter__(self) -> BoundedLines:
        return self

    def __next__(self) -> bytes:
        while True:
            line = self._take_line()
            if line is not None:
                return line
            if self._ended:
                raise StopIteration
            self._read()

    def _take_line(self) -> bytes | None:
        end = self._held.find(b"\n")
        if end > self.limit or (end < 0 and len(self._held) > self.limit):
            raise LineTooLong()
        if end < 0 and not (self._ended and self._held):
            return None
        cut = end + 1 if end >= 0 else len(self._held)
        line = bytes(self._held[:cut])
        del self._held[:cut]
        return line

    def _read(self) -> None:
        want = min(self.CHUNK, self.limit + 2 - len(self._held))
        read1 = getattr(self.stream, "read1", None)
        chunk = read1(want) if read1 is not None else self.stream.read(want)
        if chunk:
            self._held += chunk
        else:
            self._ended = True


_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")


def json_depth_within(document: bytes, limit: int) -> bool:
    """True when no array or object in `document` nests deeper than `limit`, checked
    in one pass without recursion (so it is safe to call before `json.loads`)."""
    if document.count(b"[") + document.count(b"{") <= limit:
        return True  # the usual case: too few brackets to nest that deep
    depth, in_string, escaped = 0, False, False
    for char in document:
        if in_string:
            if escaped:
                escaped = False
            elif char == _BACKSLASH:
                escaped = True
            elif char == _QUOTE:
                in_string = False
        elif char == _QUOTE:
            in_string = True
        elif char in _OPEN:
            depth += 1
            if depth > limit:
                return False
        elif char in _CLOSE:
            depth -= 1
    return True
