"""Agents for tests: exec programs written to disk, and an OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg


def exec_agent(folder: Path, name: str, body: str) -> str:
    """Write a Python program that reads the conversation JSON on stdin; return its --agent spec."""
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport json, sys\nconv = json.load(sys.stdin)\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return f"exec:{path}"


def completion(reply: str = "hi", usage: Any = None) -> dict[str, Any]:
    """A chat-completions response body."""
    return {"choices": [{"message": {"role": "assistant", "content": reply}}], "usage": usage}


def gzip_bomb(decompressed_bytes: int) -> bytes:
    """Gzip data that inflates to `decompressed_bytes` zeros (about 1,000 times smaller)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(decompressed_bytes >> 20)]
    return b"".join([*parts, packer.flush()])


class QuietHTTPServer(ThreadingHTTPServer):
    """The misbehaving agent's server: a client that hangs up early (as towerctl does past a
    cap or a deadline) is expected here, not an error to print into the captured stderr."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


@contextmanager
def openai_server(behaviour: dict[str, Any]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A chat-completions endpoint on 127.0.0.1; yields (base URL, received request bodies).

    behaviour: "reply", "usage", "status", "body" (a JSON value), "delay" (seconds before
    answering), and for misbehaving: "raw" (body bytes sent as they are), "encoding"
    (a Content-Encoding header), "headers" (more header lines), "drip" (seconds
    between single bytes of the answer, headers included), "endless" (a body of
    chunks that never ends; no length)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            body["_auth"] = self.headers.get("Authorization")
            body["_path"] = self.path
            received.append(body)
            time.sleep(behaviour.get("delay", 0))
            with suppress(OSError):
                self._answer()

        def _answer(self) -> None:
            if ("tokens" in behaviour or "events" in behaviour) and received[-1].get("stream"):
                self._stream()
                return
            status = behaviour.get("status", 200)
            data = behaviour.get("raw")
            if data is None:
                payload = behaviour.get(
                    "body", completion(behaviour.get("reply", "hi"), behaviour.get("usage"))
                )
                data = json.dumps(payload).encode()
            head = [f"HTTP/1.1 {status} X", "Content-Type: application/json", "Connection: close"]
            head.extend(behaviour.get("headers", []))
            if "encoding" in behaviour:
                head.append(f"Content-Encoding: {behaviour['encoding']}")
            if behaviour.get("endless"):
                head.append("Transfer-Encoding: chunked")
                self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode())
                chunk = b"x" * 65536
                deadline = time.monotonic() + 30  # bounded: the test server stops by itself
                while time.monotonic() < deadline:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                return
            head.append(f"Content-Length: {len(data)}")
            message = ("\r\n".join(head) + "\r\n\r\n").encode() + data
            drip = behaviour.get("drip")
            if drip is None:
                self.wfile.write(message)
                return
            deadline = time.monotonic() + 30
            for i in range(len(message)):
                if time.monotonic() > deadline:
                    return
                self.wfile.write(message[i : i + 1])
                self.wfile.flush()
                time.sleep(drip)

        def _stream(self) -> None:
            """Server-sent events: one chunk per token every "interval" seconds (after
            "first" seconds), a usage chunk if "usage", then [DONE]; "stall": stop
            sending (without closing) after that many tokens; or "events": raw bytes."""
            self.close_connection = True
            head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close"
            self.wfile.write((head + "\r\n\r\n").encode())
            self.wfile.flush()
            time.sleep(behaviour.get("first", 0))
            if "events" in behaviour:  # misbehaving: these bytes as they are, then more if
                for data in behaviour["events"]:  # "endless" (a line that never ends)
                    self.wfile.write(data)
                deadline = time.monotonic() + 30
                while behaviour.get("endless") and time.monotonic() < deadline:
                    self.wfile.write(b"x" * 65536)
                return
            for n, token in enumerate(behaviour["tokens"]):
                if n == behaviour.get("stall"):
                    time.sleep(30)
                    return
                chunk = {"choices": [{"index": 0, "delta": {"content": token}}]}
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(behaviour.get("interval", 0))
            if behaviour.get("usage") is not None:
                final = {"choices": [], "usage": behaviour["usage"]}
                self.wfile.write(b"data: " + json.dumps(final).encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()


TOWERCTL = str(Path(sys.executable).with_name("towerctl"))

MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, stdin=subprocess.DEVNULL, timeout=50)
sys.stdout.buffer.write(done.stdout)
sys.stderr.buffer.write(done.stderr)
sys.stderr.write("\\n" + str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(done.returncode)
"""


def run_measured(args: list[str], stdin: str | None = None) -> tuple[int, float, str, str]:
    """(exit code, peak RSS in MB, stdout, stderr) of towerctl run as a subprocess, measured by a
    fresh parent whose only child it is."""
    if stdin is not None:
        script = MEASURE.replace("stdin=subprocess.DEVNULL", f"stdin=open({stdin!r}, 'rb')")
    else:
        script = MEASURE
    done = subprocess.run(
        [sys.executable, "-c", script, TOWERCTL, *args],
        capture_output=True,
        text=True,
        timeout=55,
        env=os.environ.copy(),
    )
    *stderr, peak = done.stderr.split("\n")
    return done.returncode, int(peak) / 1024, done.stdout, "\n".join(stderr).strip()


def recorded(url: str) -> list[tuple[str, int]]:
    """(state, debited_sats) of every request in the store, oldest first."""
    with psycopg.connect(url) as c:
        return c.execute("SELECT state, debited_sats FROM session_requests ORDER BY id").fetchall()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent, the agent, was killed)
    try:
        with open(f"/proc/{pid}/stat") as proc_stat:
            return proc_stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
