"""`exec:` containment (SPEC 15): the reply is complete when the agent itself exits,
even while a descendant that left its process group (setsid) holds its stdout open;
towerctl is a child subreaper for the run, so every such descendant is ended and
reaped when the request ends."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from agents_fixtures import exec_agent, pid_alive, recorded
from conftest import CLI, OpenedSession, assert_store_consistent, open_session
from towerctl.errors import ExitCode

# The detached child: a new session (so no longer in the agent's process group), stdout
# inherited and held open, with a child of its own; it writes both pids, then sleeps.
DETACHED = (
    "import os, subprocess, sys, time; os.setsid(); "
    "g = subprocess.Popen(['sleep', '30']); "
    "open(sys.argv[1], 'w').write(f'{os.getpid()} {g.pid}'); time.sleep(30)"
)


def agent_leaving_a_detached_child(folder: Path) -> tuple[str, Path, Path]:
    pids, exited = folder / "pids.txt", folder / "exited.txt"
    body = (
        "import subprocess, time\n"
        f"subprocess.Popen([sys.executable, '-c', {DETACHED!r}, {str(pids)!r}])\n"
        f"while not __import__('os').path.exists({str(pids)!r}): time.sleep(0.01)\n"
        "time.sleep(0.05)\n"
        "print('the answer', flush=True)\n"
        f"open({str(exited)!r}, 'w').write(repr(time.time()))\n"
    )
    return exec_agent(folder, "detaching.py", body), pids, exited


def request(cli: CLI, s: OpenedSession, *args: str):  # type: ignore[no-untyped-def]
    return cli("session", "request", s.id, *args, "--macaroon", s.macaroon, "--json")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
@pytest.mark.timeout(40)
def test_a_setsid_child_holding_stdout_neither_delays_nor_outlives_the_reply(
    cli: CLI, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_AGENT_TIMEOUT", "10")
    agent, pids, exited = agent_leaving_a_detached_child(tmp_path)
    s = open_session(cli, 1000)
    result = request(cli, s, "hi", "--agent", agent)
    done = time.time()
    assert result.exit_code == ExitCode.OK, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert (doc["state"], doc["result"]) == ("complete", "the answer")
    assert done - float(exited.read_text()) < 1.0  # within 1 s of the agent's own exit
    child, grandchild = (int(p) for p in pids.read_text().split())
    for pid in (child, grandchild):
        assert not pid_alive(pid), pid
        assert not os.path.exists(f"/proc/{pid}"), pid  # killed and reaped, no zombie
    assert recorded(db_url) == [("complete", doc["debitedSats"])]
    assert_store_consistent(db_url)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_towerctl_stops_being_a_subreaper_and_keeps_its_own_children(
    cli: CLI, db_url: str, tmp_path: Path
) -> None:
    """The subreaper setting is towerctl's only for the agent's run, and a child that
    towerctl's process had before the request is not the agent's to end."""
    import ctypes
    import subprocess

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    mine = subprocess.Popen(["sleep", "30"])
    try:
        agent = exec_agent(tmp_path, "plain.py", "print('ok')")
        s = open_session(cli, 1000)
        assert request(cli, s, "hi", "--agent", agent).exit_code == ExitCode.OK
        assert mine.poll() is None
        flag = ctypes.c_int(-1)
        assert prctl(37, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value == 0
    finally:
        mine.kill()
        mine.wait(timeout=30)
