"""Agents that answer a session request: `echo`, `exec:COMMAND`, `openai:BASE_URL`.

An agent gets the conversation (context window plus the new user message) and
returns a reply: `complete` with a result, `rejected` with a reason (the agent
declined), or `failed` with an error message. Agents never raise for their own
failures; a misconfigured agent spec is refused before anything is written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

from towerctl.errors import BadInput

SECRET_ENVIRONMENT = ("OPENAI_API_KEY", "PGPASSWORD", "PGPASSFILE")
DECLINE_EXIT_STATUS = 10  # an exec agent that exits 10 declines; stdout is the reason
ERROR_TAIL_CHARS = 500


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


@dataclass(frozen=True)
class ExecAgent:
    """Runs a program without a shell.

    stdin: {"sessionId": ..., "messages": [{"role", "content"}, ...]} (the new message last).
    exit 0: stdout is the result. exit 10: the agent declines; stdout is the reason.
    Any other exit status or the timeout: failed, with the tail of stderr as the error.
    """

    argv: tuple[str, ...]
    timeout: float
    name: str = "exec"

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply:
        payload = json.dumps(
            {
                "sessionId": session_id,
                "messages": [{"role": m.role, "content": m.content} for m in conversation],
            },
            ensure_ascii=False,
        )
        try:
            done = subprocess.run(
                self.argv,
                input=payload.encode(),
                capture_output=True,
                timeout=self.timeout,
                check=False,
                env=agent_environment(),
            )
        except subprocess.TimeoutExpired:
            return AgentReply("failed", f"agent timed out after {self.timeout:g}s")
        except OSError as error:
            return AgentReply("failed", f"cannot run agent: {error.strerror}")
        stdout = done.stdout.decode("utf-8", errors="replace")
        if stdout.endswith("\n"):
            stdout = stdout[:-1]
        if done.returncode == 0:
            return AgentReply("complete", stdout)
        if done.returncode == DECLINE_EXIT_STATUS:
            return AgentReply("rejected", stdout.strip() or "declined by the agent")
        stderr = _tail(done.stderr.decode("utf-8", errors="replace"))
        status = (
            f"signal {-done.returncode}" if done.returncode < 0 else f"status {done.returncode}"
        )
        return AgentReply(
            "failed", f"agent exited with {status}" + (f": {stderr}" if stderr else "")
        )


@dataclass(frozen=True)
class OpenAIAgent:
    """An OpenAI-compatible `/chat/completions` endpoint."""

    base_url: str
    model: str
    api_key: str | None
    timeout: float
    name: str = "openai"

    def answer(self, session_id: str, conversation: list[ChatMessage]) -> AgentReply:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in conversation],
            "user": session_id,
        }
        url = self.base_url.rstrip("/") + "/chat/completions"
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        except httpx.TimeoutException:
            return AgentReply("failed", f"agent timed out after {self.timeout:g}s")
        except (httpx.HTTPError, httpx.InvalidURL) as error:
            return AgentReply("failed", f"agent unreachable: {type(error).__name__}")
        if response.status_code >= 400:
            detail = _tail(response.text)[:200]
            return AgentReply(
                "failed",
                f"agent answered HTTP {response.status_code}" + (f": {detail}" if detail else ""),
            )
        try:
            doc: Any = response.json()
            choice = doc["choices"][0]["message"]
            refusal = choice.get("refusal")
            content = choice.get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return AgentReply("failed", "agent answered with an unexpected body")
        usage = doc.get("usage") if isinstance(doc, dict) else None
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
        prompt = prompt if isinstance(prompt, int) and prompt >= 0 else None
        completion = completion if isinstance(completion, int) and completion >= 0 else None
        if refusal:
            return AgentReply("rejected", str(refusal), prompt, completion)
        if not isinstance(content, str):
            return AgentReply("failed", "agent answered with an unexpected body")
        return AgentReply("complete", content, prompt, completion)


def _valid_http_url(text: str) -> bool:
    import httpx

    try:
        url = httpx.URL(text)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def agent_from_spec(spec: str | None, *, model: str | None = None, timeout: float = 60.0) -> Agent:
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
        return ExecAgent(argv, timeout)
    if spec.startswith("openai:"):
        base_url = spec[7:].strip()
        if not _valid_http_url(base_url):
            raise BadInput("--agent openai: needs a base URL, e.g. openai:https://api.example/v1")
        return OpenAIAgent(
            base_url=base_url,
            model=model or os.environ.get("TOWER_OPENAI_MODEL") or "gpt-4o-mini",
            api_key=os.environ.get("TOWER_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY"),
            timeout=timeout,
        )
    raise BadInput(f"unknown agent {spec.split(':')[0]!r}: use echo, exec:COMMAND or openai:URL")
