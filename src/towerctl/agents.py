"""Agents that answer a session request: `echo`, `exec:COMMAND`, `openai:BASE_URL`.

An agent gets the conversation (context window plus the new user message) and
returns a reply: `complete` with a result, `rejected` with a reason (the agent
declined), or `failed` with an error message. Agents never raise for their own
failures; a misconfigured agent spec is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from towerctl import bounds
from towerctl.errors import BadInput

SECRET_ENVIRONMENT = ("OPENAI_API_KEY", "PGPASSWORD", "PGPASSFILE")
DECLINE_EXIT_STATUS = 10  # an exec agent that exits 10 declines; stdout is the reason
ERROR_TAIL_CHARS = bounds.AGENT_ERROR_CHARS


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class AgentReply:
    state: str  # complete | rejected | failed
    text: str  # the result, the reason, or the error message
    input_tokens: int | None = None  # as reported by the agent, when it reports usage
    output_tokens: int | None = None


class Agent(Protocol):
    @property
    def name(self) -> str: ...

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply: ...


def agent_environment() -> dict[str, str]:
    """The environment for an exec agent: towerctl's own settings and secrets removed
    (root key, macaroon, database URL, API keys)."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TOWER_") and key not in SECRET_ENVIRONMENT
    }


def clean(text: str) -> str:
    """Agent text PostgreSQL can store: NUL and unpaired surrogates become U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text


def _tail(text: str) -> str:
    text = text.strip()
    return text[-ERROR_TAIL_CHARS:] if text else ""


@dataclass(frozen=True)
class EchoAgent:
    """Offline and deterministic: the result is the user's message."""

    name: str = "echo"

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply:
        return AgentReply("complete", conversation[-1].content)


def _has_exited(pid: int) -> bool:
    """True once the process has exited, without reaping it (its pid, and so its
    process group's id, stays reserved until it is reaped)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pid: int) -> None:
    """SIGKILL to every process of the agent's process group (the agent and its children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class _OutputTooLarge(Exception):
    pass


@dataclass
class _Exchange:
    """The conversation with one exec agent: stdin written, stdout kept up to a cap,
    the tail of stderr kept, all within one deadline."""

    process: subprocess.Popen[bytes]
    payload: bytes
    deadline: float
    max_output_bytes: int

    def run(self) -> tuple[bytes, bytes] | None:
        """(stdout, stderr tail) once the agent has exited and closed its output;
        None at the deadline. Raises _OutputTooLarge past the output cap."""
        proc = self.process
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        selector = selectors.DefaultSelector()
        pending = memoryview(self.payload)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(stream.fileno(), False)
        if pending:
            selector.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        selector.register(proc.stdout, selectors.EVENT_READ)
        selector.register(proc.stderr, selectors.EVENT_READ)
        output: list[bytes] = []
        size = 0
        errors = bytearray()
        exited = False
        try:
            while True:
                if not exited and _has_exited(proc.pid):
                    exited = True
                    _kill_group(proc.pid)  # done: nothing the agent started outlives it
                if exited and not selector.get_map():
                    return b"".join(output), bytes(errors)
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if not selector.get_map():
                    time.sleep(min(remaining, 0.01))
                    continue
                for key, _ in selector.select(min(remaining, 0.05)):
                    if key.fileobj is proc.stdin:
                        try:
                            written = os.write(key.fd, pending[: 1 << 16])
                        except (BrokenPipeError, BlockingIOError) as error:
                            if isinstance(error, BlockingIOError):
                                continue
                            written = len(pending)  # the agent stopped reading: fine
                        pending = pending[written:]
                        if not pending:
                            selector.unregister(proc.stdin)
                            proc.stdin.close()
                        continue
                    try:
                        data = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        size += len(data)
                        if size > self.max_output_bytes:
                            raise _OutputTooLarge()
                        output.append(data)
                    else:
                        errors += data
                        del errors[: -4 * ERROR_TAIL_CHARS]
        finally:
            selector.close()


@dataclass(frozen=True)
class ExecAgent:
    """Runs a program without a shell, in a process group of its own.

    stdin: {"sessionId": ..., "messages": [{"role", "content"}, ...]} (the new message last).
    exit 0: stdout is the result. exit 10: the agent declines; stdout is the reason.
    Any other exit status, the deadline, or more output than the cap: failed, with
    the tail of stderr as the error. At the deadline, and as soon as the agent has
    exited, its whole process group is killed: no child of it outlives the request.
    """

    argv: tuple[str, ...]
    timeout: float
    max_output_bytes: int = bounds.reply_output_bytes(int(bounds.REPLY_CHARS.default))
    name: str = "exec"

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply:
        payload = json.dumps(
            {
                "sessionId": session_id,
                "messages": [{"role": m.role, "content": m.content} for m in conversation],
            },
            ensure_ascii=False,
        ).encode("utf-8", "surrogatepass")
        deadline = time.monotonic() + self.timeout
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=agent_environment(),
                start_new_session=True,
            )
        except OSError as error:
            return AgentReply("failed", f"cannot run agent: {error.strerror}")
        try:
            done = _Exchange(proc, payload, deadline, self.max_output_bytes).run()
        except _OutputTooLarge:
            return AgentReply(
                "failed", f"agent's reply is larger than {self.max_output_bytes:,} bytes"
            )
        finally:
            _kill_group(proc.pid)
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if done is None:
            return AgentReply("failed", f"agent timed out after {self.timeout:g}s")
        out, err = done
        stdout = out.decode("utf-8", errors="replace")
        if stdout.endswith("\n"):
            stdout = stdout[:-1]
        if proc.returncode == 0:
            return AgentReply("complete", stdout)
        if proc.returncode == DECLINE_EXIT_STATUS:
            return AgentReply("rejected", stdout.strip() or "declined by the agent")
        stderr = _tail(err.decode("utf-8", errors="replace"))
        status = (
            f"signal {-proc.returncode}" if proc.returncode < 0 else f"status {proc.returncode}"
        )
        return AgentReply(
            "failed", f"agent exited with {status}" + (f": {stderr}" if stderr else "")
        )


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
        message = doc["choices"][0]["message"]
        refusal = message.get("refusal")
        content = message.get("content")
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
    return AgentReply("complete", content or "", prompt, completion)


def _decoded_body(chunks: Iterator[bytes], encoding: str, cap: int, deadline: float) -> bytes:
    """The response body, decompressed here (gzip or deflate) so that no more than
    `cap` decompressed bytes are ever held; past it, or past the deadline, raise."""
    encoding = encoding.strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        raise _Malformed(f"agent answered with an unsupported content encoding {encoding[:20]!r}")
    inflater = None if encoding in ("", "identity") else zlib.decompressobj(zlib.MAX_WBITS | 32)
    body = bytearray()
    for chunk in chunks:
        if time.monotonic() >= deadline:
            raise _TimedOut()
        if inflater is None:
            body += chunk
        else:
            data = chunk
            while data and not inflater.eof:
                try:
                    body += inflater.decompress(data, cap + 1 - len(body))
                except zlib.error:
                    raise _Malformed("agent answered with a corrupt compressed body") from None
                if len(body) > cap:
                    break
                data = inflater.unconsumed_tail
        if len(body) > cap:
            raise _Malformed(f"agent's response is larger than {cap:,} bytes")
    if inflater is not None and not inflater.eof:
        raise _Malformed("agent answered with a truncated compressed body")
    return bytes(body)


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

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply:
        import httpx  # imported on use, as elsewhere here: most runs never need it

        timed_out = AgentReply("failed", f"agent timed out after {self.timeout:g}s")
        deadline = time.monotonic() + self.timeout
        with _Watchdog(self.timeout) as watchdog:
            try:
                status, body = self._call(session_id, conversation, deadline, watchdog)
            except _TimedOut:
                return timed_out
            except _Malformed as error:
                return AgentReply("failed", str(error))
            except httpx.TimeoutException:
                return timed_out
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as error:
                if watchdog.expired.is_set():
                    return timed_out
                return AgentReply("failed", f"agent unreachable: {type(error).__name__}")
        if status >= 400:
            detail = _tail(body.decode("utf-8", errors="replace"))[:200]
            return AgentReply(
                "failed", f"agent answered HTTP {status}" + (f": {detail}" if detail else "")
            )
        try:
            return _parse_completion(body)
        except _Malformed as error:
            return AgentReply("failed", str(error))

    def _call(
        self,
        session_id: str,
        conversation: list[ChatMessage],
        deadline: float,
        watchdog: _Watchdog,
    ) -> tuple[int, bytes]:
        import httpx

        headers = {"Accept-Encoding": "gzip, deflate"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in conversation],
            "user": session_id,
        }
        url = self.base_url.rstrip("/") + "/chat/completions"
        with (
            httpx.Client(timeout=httpx.Timeout(self.timeout)) as client,
            client.stream(
                "POST", url, json=body, headers=headers, extensions={"trace": watchdog.trace}
            ) as response,
        ):
            encoding = response.headers.get("content-encoding", "")
            data = _decoded_body(response.iter_raw(), encoding, self.max_body_bytes, deadline)
            return response.status_code, data


def _valid_http_url(text: str) -> bool:
    import httpx

    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def agent_from_spec(
    spec: str | None,
    *,
    model: str | None = None,
    timeout: float = bounds.AGENT_SECONDS.default,
    max_reply_chars: int = int(bounds.REPLY_CHARS.default),
) -> Agent:
    """Build the agent named by `--agent` / TOWER_AGENT (default `echo`)."""
    spec = (spec or os.environ.get("TOWER_AGENT") or "echo").strip()
    if spec == "echo":
        return EchoAgent()
    if spec.startswith("exec:"):
        try:
            argv = tuple(shlex.split(spec[5:]))
        except ValueError as error:
            raise BadInput(f"--agent exec: cannot parse the command ({error})") from None
        if not argv:
            raise BadInput("--agent exec: needs a command, e.g. exec:./my-agent --flag")
        if shutil.which(argv[0]) is None:
            raise BadInput(f"--agent exec: program not found or not executable: {argv[0]}")
        return ExecAgent(argv, timeout, bounds.reply_output_bytes(max_reply_chars))
    if spec.startswith("openai:"):
        base_url = spec[7:].strip()
        if not _valid_http_url(base_url):
            raise BadInput("--agent openai: needs a base URL, e.g. openai:https://api.example/v1")
        return OpenAIAgent(
            base_url=base_url,
            model=model or os.environ.get("TOWER_OPENAI_MODEL") or "gpt-4o-mini",
            api_key=os.environ.get("TOWER_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            timeout=timeout,
            max_body_bytes=bounds.http_body_bytes(max_reply_chars),
        )
    raise BadInput(f"unknown agent {spec.split(':')[0]!r}: use echo, exec:COMMAND or openai:URL")
