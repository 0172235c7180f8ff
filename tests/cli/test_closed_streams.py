"""Every command with stdout or stderr closed (a cron line's `>&-`) or full
(`>/dev/full`): the exit code is the one the contract gives, never a traceback's 1 or
the interpreter's 120.

Each command is first run with its streams on files; that run's exit code and output
say what each closed or full stream must give:
- stdout closed: what nobody can read goes nowhere, as when a reader has gone: the
  same code;
- stdout full: a command that printed something and succeeded exits 10 (the output
  could not be written); one that printed nothing, or failed, keeps its code;
- stderr closed or full: the same code (the diagnostic is lost, not the result).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

import faults
from conftest import CLI, open_session
from towerctl.errors import ExitCode

# The arguments; {sid} and {token} are filled in with a funded session's.
COMMANDS = [
    ["--version"],
    ["--help"],
    ["help", "session"],
    ["context"],
    ["context", "--json"],
    ["db", "status"],
    ["migrate"],
    ["migrate", "status"],
    ["migrate", "status", "--json"],
    ["doctor"],
    ["report", "--json"],
    ["session", "list"],
    ["session", "find", "hello"],
    ["session", "show", "{sid}"],
    ["session", "show", "nonsense"],
    ["session", "show", "{sid}", "--json"],
    ["session", "requests", "{sid}", "--macaroon", "{token}"],
    ["session", "messages", "{sid}", "--macaroon", "{token}"],
    ["session", "messages", "{sid}", "--macaroon", "not-a-token"],
    ["session", "open", "--deposit", "100", "--json"],
    ["session", "topup", "{sid}", "--amount", "5"],
    ["session", "request", "{sid}", "hello", "--macaroon", "{token}"],
    ["macaroon", "inspect", "{token}"],
    ["macaroon", "verify", "{token}", "--json"],
    ["key", "show"],
    ["completion", "bash"],
]

# Each case: what stdout and stderr are (a shell redirection), None for a file of its own.
STREAMS: dict[str, tuple[str | None, str | None]] = {
    "stdout closed": (">&-", None),
    "stderr closed": (None, "2>&-"),
    "both closed": (">&-", "2>&-"),
    "stdout full": (">/dev/full", None),
    "stderr full": (None, "2>/dev/full"),
}


def _run(
    argv: list[str], streams: tuple[str | None, str | None], env: dict[str, str], folder: Path
) -> tuple[int, bytes]:
    """Exit code and stderr (from a file; empty when stderr was closed or full)."""
    err = folder / "stderr"
    stdout, stderr = streams
    stdout = stdout or f">{shlex.quote(str(folder / 'stdout'))}"
    stderr = stderr or f"2>{shlex.quote(str(err))}"
    done = subprocess.run(
        ["bash", "-c", f"{shlex.join([*faults.TOWERCTL, *argv])} {stdout} {stderr}"],
        env=faults.process_env(env),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    return done.returncode, err.read_bytes() if err.exists() else b""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_every_command_with_a_standard_stream_closed_or_full(
    cli: CLI, tower_env: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    s = open_session(cli, 10_000)
    argv = [a.format(sid=s.id, token=s.macaroon) for a in args]
    plain = tmp_path / "plain"
    plain.mkdir()
    err = plain / "stderr"
    with (plain / "stdout").open("wb") as out, err.open("wb") as errors:
        first = subprocess.run(
            [*faults.TOWERCTL, *argv], env=faults.process_env(tower_env), stdout=out,
            stderr=errors, stdin=subprocess.DEVNULL, timeout=60, check=False,
        )  # fmt: skip
    code, printed = first.returncode, (plain / "stdout").read_bytes()
    assert code != ExitCode.INTERNAL, err.read_text()
    if argv[-1] == "--json" and code == ExitCode.OK:
        json.loads(printed)  # the plain run is a real one
    wrong = {}
    for name, streams in STREAMS.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        got, stderr = _run(argv, streams, tower_env, folder)
        expected = code
        if name == "stdout full" and printed and code == ExitCode.OK:
            expected = ExitCode.WRITE_FAILED
        if got != expected or b"Traceback" in stderr:
            wrong[name] = (got, expected, stderr.decode(errors="replace")[-300:])
    assert wrong == {}, wrong
