"""Agents for tests: exec programs written to disk, and an OpenAI-compatible HTTP server."""

from __future__ import annotations

import json
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def exec_agent(folder: Path, name: str, body: str) -> str:
    """Write a Python program that reads the conversation JSON on stdin; return its --agent spec."""
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport json, sys\nconv = json.load(sys.stdin)\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return f"exec:{path}"


@contextmanager
def openai_server(behaviour: dict[str, Any]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A chat-completions endpoint on 127.0.0.1; yields (base URL, received request bodies)."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            body["_auth"] = self.headers.get("Authorization")
            body["_path"] = self.path
            received.append(body)
            time.sleep(behaviour.get("delay", 0))
            status = behaviour.get("status", 200)
            payload = behaviour.get(
                "body",
                {
                    "choices": [
                        {"message": {"role": "assistant", "content": behaviour.get("reply", "hi")}}
                    ],
                    "usage": behaviour.get("usage"),
                },
            )
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()
