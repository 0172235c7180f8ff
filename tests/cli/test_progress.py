"""A progress display on a terminal for long work — migrations, batches — on stderr,
and none when stderr is not a terminal or NO_COLOR is set."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import faults
from conftest import CLI, open_session
from terminal import emulate, read_pty, run_on_pty


def slow_migrations(folder: Path, count: int = 30) -> Path:
    folder.mkdir()
    for n in range(1, count + 1):
        (folder / f"{n:04d}_slow.sql").write_text(
            f"SELECT pg_sleep(0.05);\nCREATE TABLE t{n} ();\n"
        )
    return folder


def env_without_no_color(tower_env: dict[str, str]) -> dict[str, str]:
    env = faults.process_env(tower_env)
    env.pop("NO_COLOR", None)
    return env


@pytest.mark.timeout(120)
def test_migrate_shows_progress_on_a_terminal(
    tower_env: dict[str, str], empty_db_url: str, tmp_path: Path
) -> None:
    folder = slow_migrations(tmp_path / "sql")
    env = {**env_without_no_color(tower_env), "TOWER_DATABASE_URL": empty_db_url}
    screen = run_on_pty(["migrate", "--dir", str(folder)], env)
    assert screen.exit_code == 0, screen.text
    assert "applying migrations" in screen.text
    assert "applied 30 migrations" in screen.text
    # As a person sees it: the bar redraws in place, ends whole, and no code shows as text.
    shown = emulate(screen.text.encode(), 120)
    assert shown.row_with("applied 30 migrations")
    assert re.search(r"(\\x1b|\x1b)?\[[0-9;]*m", shown.text) is None, shown.text
    assert len([line for line in shown.lines if "applying migrations" in line]) <= 1


@pytest.mark.timeout(120)
def test_no_progress_with_no_color_or_off_a_terminal(
    tower_env: dict[str, str], empty_db_url: str, tmp_path: Path
) -> None:
    folder = slow_migrations(tmp_path / "sql", 12)
    env = {**faults.process_env(tower_env), "TOWER_DATABASE_URL": empty_db_url}
    screen = run_on_pty(["migrate", "--dir", str(folder)], env)  # NO_COLOR=1 is set
    assert screen.exit_code == 0 and "applying migrations" not in screen.text
    plain = faults.run(["migrate", "--dir", str(folder)], env_without_no_color(tower_env))
    assert "applying migrations" not in plain.stderr


@pytest.mark.timeout(120)
def test_a_batch_shows_progress_on_stderr_when_its_output_goes_to_a_file(
    cli: CLI, tower_env: dict[str, str], tmp_path: Path
) -> None:
    s = open_session(cli, 100_000)
    agent = faults.sleepy_agent(tmp_path, 0.05)
    lines = "".join(json.dumps({"message": f"q{i}"}) + "\n" for i in range(25))
    (tmp_path / "in.ndjson").write_text(lines)
    master, slave = os.openpty()
    with (tmp_path / "in.ndjson").open("rb") as fin, (tmp_path / "out.ndjson").open("wb") as fout:
        proc = subprocess.Popen(
            [*faults.TOWERCTL, "session", "request", s.id, "--batch", "--agent", agent],
            env={**env_without_no_color(tower_env), "TOWER_MACAROON": s.macaroon},
            stdin=fin,
            stdout=fout,
            stderr=slave,
            start_new_session=True,
        )
    os.close(slave)
    shown = read_pty(master, 90, proc=proc)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    assert b"answering requests" in shown
    assert len((tmp_path / "out.ndjson").read_text().splitlines()) == 25
