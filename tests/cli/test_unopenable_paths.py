"""Paths the system will not open for the user, and outputs that cannot be written.

A `--dir` or `TOWER_HOME` too long for the system or unreadable to the user exits 2 with
one line; `-o` on a read-only file system exits 10; `--version` with stdout closed or
full exits as every other command does, without a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, LocalUser, open_session
from faults import mounted_tmpfs
from towerctl.errors import ExitCode

TOWERCTL = [sys.executable, "-m", "towerctl"]


def too_long(tmp_path: Path) -> str:
    return str(tmp_path / ("a" * 300))


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("command", [["migrate", "status"], ["migrate", "new", "x"]])
def test_a_dir_too_long_for_the_system_exits_2(
    command: list[str], cli: CLI, tmp_path: Path
) -> None:
    result = cli(*command, "--dir", too_long(tmp_path))
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
    assert "File name too long" in one_line(result.stderr)


def test_a_tower_home_too_long_for_the_system_exits_2(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_HOME", too_long(tmp_path))
    monkeypatch.delenv("TOWER_DATABASE_URL")  # the embedded server's data lives in the home
    result = cli("session", "list")
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
    assert "File name too long" in one_line(result.stderr)


def test_a_dir_unreadable_to_the_user_exits_2(owner_user: LocalUser, tmp_path: Path) -> None:
    if owner_user.towerctl is None:
        pytest.skip("no Python that the second user can run")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    home = Path(f"/tmp/towerctl-unreadable-{os.getpid()}")
    env = {"TOWER_HOME": str(home / "home"), "TOWER_DATABASE_URL": "postgresql:///none"}
    try:
        result = owner_user.run(*owner_user.towerctl, "migrate", "new", "x", "--dir",
                                str(private / "migrations"), env=env)  # fmt: skip
    finally:
        subprocess.run(["rm", "-rf", str(home)], check=False, timeout=60)
    assert result.returncode == ExitCode.BAD_INPUT, result.stderr
    assert "Permission denied" in one_line(result.stderr)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


def test_o_on_a_read_only_file_system_exits_10(cli: CLI, read_only_folder: Path) -> None:
    opened = open_session(cli)
    target = read_only_folder / "out.json"
    result = cli("session", "messages", opened.id, "--format", "json", "-o", str(target),
                 "--macaroon", opened.macaroon)  # fmt: skip
    assert result.exit_code == ExitCode.WRITE_FAILED, result.stderr
    assert "Read-only file system" in one_line(result.stderr)
    assert list(read_only_folder.iterdir()) == []


def test_version_with_stdout_closed_exits_0_quietly() -> None:
    # `>&-`: the descriptor is not open at all; what would be printed goes nowhere.
    result = subprocess.run(
        [*TOWERCTL, "--version"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
        pass_fds=(), close_fds=True, check=False, timeout=60,
        preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""


def test_version_on_a_full_device_exits_10() -> None:
    with open("/dev/full", "wb") as full:
        result = subprocess.run([*TOWERCTL, "--version"], stdout=full, stderr=subprocess.PIPE,
                                check=False, timeout=60)  # fmt: skip
    assert result.returncode == ExitCode.WRITE_FAILED
    assert "No space left on device" in one_line(result.stderr.decode())
