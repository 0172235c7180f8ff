"""`openai:BASE_URL`: a chat-completions endpoint under one deadline and a body cap."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from towerctl import bounds
from towerctl.agents.base import AgentReply, ChatMessage, TextSink, _tail


class _Malformed(Exception):
    """The agent's HTTP response is not one towerctl can use; `str()` says why, briefly."""


class _TimedOut(Exception):
    pass


def _token_count(usage: dict[str, Any], key: str) -> int | None:
    """A usage count: absent or null is unknown; anything but a whole number (bool is
    not one) from 0 to the bound makes the response malformed."""
    value = usage.get(key)
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= bounds.REPORTED_TOKENS.default:
        raise _Malformed(f"agent reported an invalid {key}")
    return value


def _parse_completion(body: bytes) -> AgentReply:
    """The reply in a chat-completions response body (already bounded in size)."""
    if not bounds.json_depth_within(body, bounds.JSON_DEPTH.whole_value()):
        raise _Malformed("agent answered with JSON nested too deeply")
    try:
        doc: Any = json.loads(body)
    except (ValueError, RecursionError):
        raise _Malformed("agent answered with a body that is not JSON") from None
    try:
        choice = doc["choices"][0]
        message = choice["message"]
        refusal = message.get("refusal")
        content = message.get("content")
        stopped_at_budget = choice.get("finish_reason") == "length"
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _Malformed("agent answered with an unexpected body") from None
    if not isinstance(content, str | None) or not isinstance(refusal, str | None):
        raise _Malformed("agent answered with an unexpected body")
    usage = doc.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _Malformed("agent reported usage that is not an object")
    prompt = _token_count(usage, "prompt_tokens") if usage else None
    completion = _token_count(usage, "completion_tokens") if usage else None
    if refusal:
        return AgentReply("rejected", refusal, prompt, completion)
    return AgentReply("complete", content or "", prompt, completion, stopped_at_budget)


def _stream_event(line: bytes) -> Any:
    """The JSON of one server-sent event's `data:` line; None for any other line (event
    names, ids, comments, blank separators), DONE for `data: [DONE]`."""
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return DONE
    if not bounds.json_depth_within(data, bounds.JSON_DEPTH.whole_value()):
        raise _Malformed("agent streamed JSON nested too deeply")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise _Malformed("agent streamed an event that is not JSON") from None


DONE = object()


@dataclass
class _StreamedReply:
    """A chat-completions stream (`"stream": true`) read event by event: the text shown
    to `on_text` as it arrives, cut after `most_chars` (the budget), usage from the
    final chunk (`stream_options.include_usage`) when the server sends it."""

    on_text: TextSink | None
    most_chars: int
    line_cap: int

    def read(self, pieces: Iterator[bytes]) -> AgentReply:
        text: list[str] = []
        refusal: list[str] = []
        size = 0
        usage: dict[str, Any] = {}
        stopped = False
        finished = False
        held = b""
        for piece in pieces:
            *lines, held = (held + piece).split(b"\n")
            if len(held) > self.line_cap:
                raise _Malformed(f"agent streamed a line longer than {self.line_cap:,} bytes")
            for line in lines:
                event = _stream_event(line.rstrip(b"\r"))
                if event is DONE:
                    return self._reply(text, refusal, usage, stopped)
                if event is None:
                    continue
                delta, finish, reported = self._fields(event)
                usage = reported or usage
                stopped = stopped or finish == "length"
                finished = finished or finish is not None
                content, refused = delta
                if refused:
                    refusal.append(refused)
                if content:
                    text.append(content)
                    size += len(content)
                    if self.on_text is not None:
                        self.on_text(content)
                    if size > self.most_chars:
                        return self._reply(text, refusal, usage, True)  # cut at the budget
        if not finished:  # neither [DONE] nor a finish reason: the stream broke off
            raise _Malformed("agent's stream ended before the reply did")
        return self._reply(text, refusal, usage, stopped)

    @staticmethod
    def _fields(event: Any) -> tuple[tuple[str | None, str | None], Any, dict[str, Any] | None]:
        """((content, refusal), finish_reason, usage) of one chunk."""
        try:
            choices = event.get("choices") or []
            choice = choices[0] if choices else {}
            delta = choice.get("delta") or {}
            content, refusal = delta.get("content"), delta.get("refusal")
            finish = choice.get("finish_reason")
            usage = event.get("usage")
        except (AttributeError, IndexError, TypeError):
            raise _Malformed("agent streamed an unexpected chunk") from None
        if not isinstance(content, str | None) or not isinstance(refusal, str | None):
            raise _Malformed("agent streamed an unexpected chunk")
        if usage is not None and not isinstance(usage, dict):
            raise _Malformed("agent reported usage that is not an object")
        if usage:
            _token_count(usage, "prompt_tokens")
            _token_count(usage, "completion_tokens")
        return (content, refusal), finish, usage

    @staticmethod
    def _reply(
        text: list[str], refusal: list[str], usage: dict[str, Any], truncated: bool
    ) -> AgentReply:
        prompt = _token_count(usage, "prompt_tokens")
        completion = _token_count(usage, "completion_tokens")
        if refusal and not text:
            return AgentReply("rejected", "".join(refusal), prompt, completion)
        return AgentReply("complete", "".join(text), prompt, completion, truncated)


def _decoded_chunks(
    chunks: Iterator[bytes], encoding: str, cap: int, deadline: float
) -> Iterator[bytes]:
    """The response body as it arrives, decompressed here (gzip or deflate) so that no
    more than `cap` decompressed bytes are ever produced; past it, or past the
    deadline, raise."""
    encoding = encoding.strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        raise _Malformed(f"agent answered with an unsupported content encoding {encoding[:20]!r}")
    inflater = None if encoding in ("", "identity") else zlib.decompressobj(zlib.MAX_WBITS | 32)
    size = 0
    for chunk in chunks:
        if time.monotonic() >= deadline:
            raise _TimedOut()
        if inflater is None:
            pieces = [chunk]
        else:
            pieces = []
            data, held = chunk, size
            while data and not inflater.eof:
                try:
                    pieces.append(inflater.decompress(data, cap + 1 - held))
                except zlib.error:
                    raise _Malformed("agent answered with a corrupt compressed body") from None
                held += len(pieces[-1])
                if held > cap:
                    break
                data = inflater.unconsumed_tail
        for piece in pieces:
            size += len(piece)
            if size > cap:
                raise _Malformed(f"agent's response is larger than {cap:,} bytes")
            if piece:
                yield piece
    if inflater is not None and not inflater.eof:
        raise _Malformed("agent answered with a truncated compressed body")


def _decoded_body(chunks: Iterator[bytes], encoding: str, cap: int, deadline: float) -> bytes:
    """The whole response body (see `_decoded_chunks`)."""
    return b"".join(_decoded_chunks(chunks, encoding, cap, deadline))


class _Watchdog:
    """Ends an HTTP call at its deadline, whatever phase it is in: every socket the call
    opens is recorded (httpx's `trace` extension) and shut down when time is up, which
    wakes any read or write blocked on it."""

    def __init__(self, seconds: float) -> None:
        self.expired = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if not event.endswith(("connect_tcp.complete", "connect_unix_socket.complete")):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.append(sock)
            if self.expired.is_set():
                self._cut(sock)

    def _expire(self) -> None:
        self.expired.set()
        with self._lock:
            for sock in self._sockets:
                self._cut(sock)

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


@dataclass(frozen=True)
class OpenAIAgent:
    """An OpenAI-compatible `/chat/completions` endpoint.

    One deadline covers the whole call (connect, send, every read); the body is read
    decompressed up to a cap; usage counts are checked. Anything else is `failed`."""

    base_url: str
    model: str
    api_key: str | None
    timeout: float
    max_body_bytes: int = bounds.http_body_bytes(int(bounds.REPLY_CHARS.default))
    name: str = "openai"
    max_reply_chars: int = int(bounds.REPLY_CHARS.default)

    def answer(
        self,
        session_id: str,
        conversation: list[ChatMessage],
        max_output_tokens: int | None = None,
        on_text: TextSink | None = None,
    ) -> AgentReply:
        timed_out = AgentReply("failed", f"agent timed out after {self.timeout:g}s")
        deadline = time.monotonic() + self.timeout
        with _Watchdog(self.timeout) as watchdog:
            try:
                status, body = self._call(
                    session_id, conversation, max_output_tokens, on_text, deadline, watchdog
                )
            except _TimedOut:
                return timed_out
            except _Malformed as error:
                return timed_out if watchdog.expired.is_set() else AgentReply("failed", str(error))
            except httpx.TimeoutException:
                return timed_out
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as error:
                if watchdog.expired.is_set():
                    return timed_out
                return AgentReply("failed", f"agent unreachable: {_unreachable_reason(error)}")
        if status >= 400 and isinstance(body, bytes):
            detail = _tail(body.decode("utf-8", errors="replace"))[:200]
            return AgentReply(
                "failed", f"agent answered HTTP {status}" + (f": {detail}" if detail else "")
            )
        if watchdog.expired.is_set():
            return timed_out  # whatever was read ended because the deadline cut it
        if isinstance(body, AgentReply):
            return body  # a stream, read as it came
        try:
            return _parse_completion(body)
        except _Malformed as error:
            return AgentReply("failed", str(error))

    def _call(
        self,
        session_id: str,
        conversation: list[ChatMessage],
        max_output_tokens: int | None,
        on_text: TextSink | None,
        deadline: float,
        watchdog: _Watchdog,
    ) -> tuple[int, bytes | AgentReply]:
        """(status, body); with `on_text`, the reply is asked for as a stream and, when
        the server streams it, read as it comes: (status, the reply)."""
        headers = {"Accept-Encoding": "gzip, deflate"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in conversation],
            "user": session_id,
        }
        if max_output_tokens is not None:  # the budget, in both spellings servers know
            body["max_tokens"] = body["max_completion_tokens"] = max_output_tokens
        if on_text is not None:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        url = self.base_url.rstrip("/") + "/chat/completions"
        with (
            httpx.Client(timeout=httpx.Timeout(self.timeout)) as client,
            client.stream(
                "POST", url, json=body, headers=headers, extensions={"trace": watchdog.trace}
            ) as response,
        ):
            if 300 <= response.status_code < 400:
                raise _Malformed(_redirect_reason(response.status_code, response.headers))
            encoding = response.headers.get("content-encoding", "")
            streamed = "text/event-stream" in response.headers.get("content-type", "")
            if on_text is not None and streamed and response.status_code < 400:
                pieces = _decoded_chunks(response.iter_raw(), encoding, 1 << 62, deadline)
                most = self.max_reply_chars  # read no further than the reply bound
                if max_output_tokens is not None:  # nor than the budget
                    most = min(most, 4 * max_output_tokens)
                reader = _StreamedReply(on_text, most, self.max_body_bytes)
                return response.status_code, reader.read(pieces)
            data = _decoded_body(response.iter_raw(), encoding, self.max_body_bytes, deadline)
            return response.status_code, data


def _redirect_reason(status: int, headers: Any) -> str:
    """What a redirect says, so the operator can point the agent at the new address:
    towerctl does not follow redirects (a POST with a bearer token goes only where
    the operator sent it)."""
    location = "".join(ch for ch in headers.get("location", "")[:300] if ch.isprintable())
    if not location:
        return f"agent answered HTTP {status}, a redirect without a Location"
    base = location.removesuffix("/chat/completions")
    hint = f" (use openai:{base})" if base != location else ""
    return (
        f"agent answered HTTP {status}, a redirect to {location}; towerctl does not "
        f"follow redirects{hint}"
    )


def _unreachable_reason(error: BaseException) -> str:
    """Why the endpoint could not be reached, in words (never a Python class name)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    if isinstance(error, httpx.ConnectError):
        return "the connection failed"
    if isinstance(error, httpx.RemoteProtocolError | httpx.LocalProtocolError):
        return "the server broke the HTTP protocol"
    if isinstance(error, httpx.InvalidURL):
        return "the URL is not valid"
    return "the request did not complete"


def valid_base_url(text: str) -> bool:
    """An http or https URL with a host."""
    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)
