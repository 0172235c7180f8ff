"""`exec:COMMAND`: a program in its own process group, one deadline, capped output."""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
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


PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PR_GET_CHILD_SUBREAPER = 37


def _subreaper(on: bool) -> bool | None:
    """Make this process a child subreaper (Linux: orphaned descendants become its
    children, not init's) or stop being one; the setting before, None where unknown."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        was = ctypes.c_int(0)
        if prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) != 0:
            return None
        if prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return bool(was.value)


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (parent pid -> child pids)."""
    tree: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(spare: set[int]) -> list[int]:
    """This process's descendants, except the children in `spare` and theirs."""
    tree = _children()
    found: list[int] = []
    stack = [pid for pid in tree.get(os.getpid(), []) if pid not in spare]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(tree.get(pid, []))
    return found


def _end_descendants(spare: set[int]) -> None:
    """SIGKILL every descendant the agent left (those that left its process group
    became this subreaper's children when their parents died), and reap them; again
    for any that a killed one had started, within a bound."""
    give_up = time.monotonic() + 2
    while (found := _descendants(spare)) and time.monotonic() < give_up:
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.002)
        for pid in found:  # never a blocking wait: one that cannot be killed is given up
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # ours (now): reaped once dead; others': not ours


class _OutputTooLarge(Exception):
    pass


@dataclass
class _Exchange:
    """The conversation with one exec agent: stdin written, stdout kept up to a cap
    (and shown to `on_text` as it arrives), the tail of stderr kept, all within one
    deadline."""

    process: subprocess.Popen[bytes]
    payload: bytes
    deadline: float
    max_output_bytes: int
    on_text: TextSink | None = None

    def __post_init__(self) -> None:
        self._output: list[bytes] = []
        self._size = 0
        self._errors = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def run(self) -> tuple[bytes, bytes] | None:
        """(stdout, stderr tail) once the agent itself has exited: what it wrote is read
        to the end of what is buffered, never waiting for an end of file that a
        descendant holding its stdout may keep back; None at the deadline. Raises
        _OutputTooLarge past the output cap."""
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
        try:
            while True:
                if _has_exited(proc.pid):
                    _kill_group(proc.pid)  # done: nothing the agent started outlives it
                    for key in list(selector.get_map().values()):
                        if key.fileobj is not proc.stdin:  # what is buffered, and no more
                            with contextlib.suppress(BlockingIOError):
                                while self._take(key.fd, key.fileobj is proc.stdout):
                                    pass
                    return b"".join(self._output), bytes(self._errors)
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
                        if not self._take(key.fd, key.fileobj is proc.stdout):
                            selector.unregister(key.fileobj)
                    except BlockingIOError:
                        continue
        finally:
            selector.close()

    def _take(self, fd: int, is_stdout: bool) -> bool:
        """Read once from stdout or stderr: False at its end; BlockingIOError when
        nothing is buffered."""
        data = os.read(fd, 1 << 16)
        if not data:
            return False
        if is_stdout:
            self._size += len(data)
            if self._size > self.max_output_bytes:
                raise _OutputTooLarge()
            self._output.append(data)
            if self.on_text is not None:
                text = self._decoder.decode(data)
                if text:
                    self.on_text(text)
        else:
            self._errors += data
            del self._errors[: -4 * ERROR_TAIL_CHARS]
        return True


@dataclass(frozen=True)
class ExecAgent:
    """Runs a program without a shell, in a process group of its own.

    stdin: {"sessionId": ..., "messages": [{"role", "content"}, ...]} (the new message last).
    exit 0: stdout is the result. exit 10: the agent declines; stdout is the reason.
    Any other exit status, the deadline, or more output than the cap: failed, with
    the tail of stderr as the error. The reply is complete when the agent itself
    exits (what it wrote is read; an end of file a descendant holds back is not waited
    for). At the deadline, and as soon as the agent has exited, its whole process group
    is killed; towerctl is a child subreaper for the run (Linux), so descendants that
    left the group become its children, and every one left is killed and reaped at the
    end: nothing the agent started outlives the request.
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
        spare = set(_children().get(os.getpid(), []))  # towerctl's own children, if any
        was_subreaper = _subreaper(True)
        try:
            return self._run(payload, deadline, on_text)
        finally:
            if was_subreaper is not None:
                _end_descendants(spare)
                _subreaper(was_subreaper)

    def _run(self, payload: bytes, deadline: float, on_text: TextSink | None) -> AgentReply:
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
            done = _Exchange(proc, payload, deadline, self.max_output_bytes, on_text).run()
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
