"""`exec:COMMAND`: a program in its own process group, one deadline, capped output."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from towerctl import bounds
from towerctl.agents.base import (
    DECLINE_EXIT_STATUS,
    ERROR_TAIL_CHARS,
    AgentReply,
    ChatMessage,
    TextSink,
    _tail,
    agent_environment,
)


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

    def answer(
        self,
        session_id: str,
        conversation: list[ChatMessage],
        max_output_tokens: int | None = None,
        on_text: TextSink | None = None,
    ) -> AgentReply:
        document: dict[str, object] = {
            "sessionId": session_id,
            "messages": [{"role": m.role, "content": m.content} for m in conversation],
        }
        if max_output_tokens is not None:
            document["maxOutputTokens"] = max_output_tokens
        payload = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
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
