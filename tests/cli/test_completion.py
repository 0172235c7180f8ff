"""Shell completion: installable from the CLI, completing commands, options, --format
values and session ids from the store — fast, bounded and silent on failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import faults
from conftest import CLI, open_session
from towerctl.errors import ExitCode

BIN = Path(sys.executable).parent


def complete(words: str, env: dict[str, str]) -> list[str]:
    """What towerctl answers bash for the command line `words` (completing its last word)."""
    parts = words.split(" ")
    done = subprocess.run(
        [*faults.TOWERCTL],
        env={
            **env,
            "_TOWERCTL_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(parts) - 1),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_script_for_each_shell_is_printed(cli: CLI, shell: str) -> None:
    done = cli("completion", shell)
    assert done.exit_code == ExitCode.OK
    assert "_TOWERCTL_COMPLETE" in done.stdout


def test_an_unknown_shell_is_bad_input(cli: CLI) -> None:
    assert cli("completion", "tcsh").exit_code == ExitCode.BAD_INPUT


@pytest.mark.timeout(60)
def test_commands_options_and_formats_complete(tower_env: dict[str, str]) -> None:
    env = faults.process_env(tower_env)
    assert complete("towerctl ses", env) == ["session"]
    assert set(complete("towerctl session ", env)) >= {"open", "request", "messages"}
    assert "--format" in complete("towerctl session messages x --fo", env)
    assert complete("towerctl session messages x --format n", env) == ["ndjson"]


@pytest.mark.timeout(60)
def test_session_ids_complete_from_the_store(cli: CLI, tower_env: dict[str, str]) -> None:
    first, second = open_session(cli), open_session(cli)
    env = faults.process_env(tower_env)
    found = complete("towerctl session show ", env)
    assert {first.id, second.id} <= set(found)
    assert complete(f"towerctl session show {first.id[:8]}", env) == [first.id]


@pytest.mark.timeout(60)
def test_completion_is_silent_and_quick_when_the_store_is_unreachable(
    tower_env: dict[str, str],
) -> None:
    env = faults.process_env({**tower_env, "TOWER_DATABASE_URL": "postgresql://x@127.0.0.1:1/x"})
    began = time.monotonic()
    assert complete("towerctl session show ", env) == []
    assert time.monotonic() - began < 10


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_itself_completes_with_the_installed_script(
    cli: CLI, tower_env: dict[str, str], tmp_path: Path
) -> None:
    script = tmp_path / "towerctl.bash"
    script.write_text(cli("completion", "bash").stdout)
    program = (
        f"source {script}; COMP_WORDS=(towerctl session mess); COMP_CWORD=2; "
        '_towerctl_completion towerctl; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    env = {**faults.process_env(tower_env), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", program], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.stdout.split() == ["messages"], done.stderr
