#!/usr/bin/env python3
"""towerctl beside `llm` on a streamed reply (issue 25): one local OpenAI-compatible
server that streams a fixed reply (a fixed time to the first token, then a fixed
token rate), and each tool run on a pseudo-terminal as a person runs it:

    towerctl session request SID MESSAGE --agent openai:URL   (writes the transcript too)
    llm -m bench-stream MESSAGE                                (logs to its SQLite too)

Measured per run: the time to the first byte of the reply on the terminal, and the
total time until the process has exited. Runs alternate (A B A B ...) after one
unmeasured warm-up each; the table gives medians and towerctl / llm.

    python bench/streaming.py [--runs 7] [--first 0.3] [--tokens 40] [--interval 0.02]

`llm` is installed from PyPI into the git-ignored bench/.peers/llm on the first run.
Goals: time to first byte <= 1.0x llm's, total <= 1.05x llm's.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PEERS, run_quiet
from tools import Server, find_towerctl

MODEL = "bench-stream"
MESSAGE = "Tell me about the weather on the coast."


def ensure_llm() -> Path:
    """`llm` from PyPI, in a virtual environment of its own."""
    venv = PEERS / "llm"
    llm = venv / "bin" / "llm"
    if not llm.exists():
        print("installing llm from PyPI into bench/.peers/llm", file=sys.stderr)
        run_quiet([sys.executable, "-m", "venv", venv])
        run_quiet([venv / "bin" / "pip", "install", "--quiet", "llm"])
    return llm


def streaming_server(first: float, tokens: int, interval: float) -> tuple[ThreadingHTTPServer, str]:
    """Chat completions streamed: `first` seconds to the first token, then one token
    every `interval` seconds, usage, [DONE]."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            self.close_connection = True
            if not body.get("stream"):
                self.send_error(400, "this bench server only streams")
                return
            self.wfile.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            )
            self.wfile.flush()
            time.sleep(first)
            for n in range(tokens):
                chunk = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": MODEL,
                    "choices": [{"index": 0, "delta": {"content": f"tok{n} "}}],
                }
                self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
                time.sleep(interval)
            done = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": tokens,
                    "total_tokens": 10 + tokens,
                },
            }
            self.wfile.write(b"data: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n")
            self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def on_pty(argv: list[str | Path], env: dict[str, str]) -> tuple[float, float, bytes]:
    """(seconds to the first byte of the reply, seconds to exit, what reached the pty)."""
    master, slave = os.openpty()
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True
    )
    os.close(slave)
    first: float | None = None
    data = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if first is None and b"tok0" in data:
                first = time.perf_counter() - started
        elif proc.poll() is not None:
            break
    proc.wait()
    total = time.perf_counter() - started
    os.close(master)
    if proc.returncode != 0 or first is None or b"tok" not in data:
        raise SystemExit(f"bench: {argv[0]} failed ({proc.returncode}): {data[-300:]!r}")
    return first, total, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--first", type=float, default=0.3, help="seconds to the first token")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between tokens")
    parser.add_argument("--towerctl", help="the towerctl to measure (default: beside python)")
    args = parser.parse_args()
    towerctl = find_towerctl(args.towerctl)
    llm = ensure_llm()
    work = Path(tempfile.mkdtemp(prefix="stream-"))
    work.chmod(0o755)  # the server runs as another user when we are root
    http, url = streaming_server(args.first, args.tokens, args.interval)
    db = Server(work / "pgdata")
    try:
        name = db.create()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("TOWER_", "PG", "LLM_"))}
        base |= {"TERM": "xterm-256color", "NO_COLOR": "1", "COLUMNS": "200"}
        tower = base | {
            "TOWER_DATABASE_URL": db.url(name),
            "TOWER_HOME": str(work / "home"),
            "TOWER_ROOT_KEY": os.urandom(32).hex(),
            "TOWER_OPENAI_MODEL": MODEL,
        }
        run_quiet([towerctl, "migrate"], tower)
        opened = json.loads(
            run_quiet([towerctl, "session", "open", "--deposit", "100000000", "--json"], tower)
        )
        token = work / "macaroon"
        token.write_text(opened["macaroon"] + "\n")
        token.chmod(0o600)
        llm_home = work / "llm"
        llm_home.mkdir()
        (llm_home / "extra-openai-models.yaml").write_text(
            f'- model_id: {MODEL}\n  model_name: {MODEL}\n  api_base: "{url}"\n'
        )
        llm_env = base | {"LLM_USER_PATH": str(llm_home), "OPENAI_API_KEY": "sk-bench"}
        contenders: dict[str, tuple[list[str | Path], dict[str, str]]] = {
            "towerctl": (
                [
                    towerctl,
                    "session",
                    "request",
                    opened["sessionId"],
                    MESSAGE,
                    "--agent",
                    f"openai:{url}",
                    "--macaroon-file",
                    token,
                ],
                tower,
            ),
            "llm": ([llm, "-m", MODEL, MESSAGE], llm_env),
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        for argv, env in contenders.values():
            on_pty(argv, env)  # warm-up, unmeasured
        for _ in range(args.runs):
            for tool, (argv, env) in contenders.items():
                first, total, _ = on_pty(argv, env)
                results[tool].append((first, total))
    finally:
        http.shutdown()
        db.close()
    stream_s = args.first + args.tokens * args.interval
    print(
        f"Streamed reply: first token after {args.first:g} s, {args.tokens} tokens "
        f"{args.interval * 1000:g} ms apart (about {stream_s:.2f} s of stream); "
        f"{args.runs} runs each, alternating, medians.\n"
    )
    print("| tool | first reply byte (s) | total (s) |")
    print("|---|---|---|")
    medians = {}
    for tool, runs in results.items():
        first_m = statistics.median(r[0] for r in runs)
        total_m = statistics.median(r[1] for r in runs)
        medians[tool] = (first_m, total_m)
        print(f"| {tool} | {first_m:.3f} | {total_m:.3f} |")
    (tf, tt), (lf, lt) = medians["towerctl"], medians["llm"]
    print(f"| towerctl / llm | {tf / lf:.2f}× (goal ≤ 1.00×) | {tt / lt:.2f}× (goal ≤ 1.05×) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
