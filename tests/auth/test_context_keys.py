"""Which database, home and key a command uses (`context`, `db url`, `db status`), and the
root key's life: shown, rotated, never created by a command that only reads (SPEC 17)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conftest import CLI, OpenedSession, open_session
from towerctl.errors import ExitCode


@pytest.fixture
def home_key(tower_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The root key in TOWER_HOME (not from TOWER_ROOT_KEY); returns the home."""
    monkeypatch.delenv("TOWER_ROOT_KEY")
    return Path(tower_env["TOWER_HOME"])


def test_context_names_the_database_without_its_password(
    cli: CLI, tower_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_DATABASE_URL", "postgresql://bob:s3cret-pw@db.example:5433/tower")
    monkeypatch.setenv("TOWER_MIGRATIONS_DIR", "/srv/migrations")
    done = cli("context", "--json")
    assert done.exit_code == ExitCode.OK, done.stderr
    doc = json.loads(done.stdout)
    assert doc["database"] == {
        "value": "postgresql://bob@db.example:5433/tower",
        "source": "TOWER_DATABASE_URL",
    }
    assert doc["home"] == {"value": tower_env["TOWER_HOME"], "source": "TOWER_HOME"}
    assert doc["migrationsDir"] == {"value": "/srv/migrations", "source": "TOWER_MIGRATIONS_DIR"}
    assert doc["rootKeyId"]["source"] == "TOWER_ROOT_KEY" and len(doc["rootKeyId"]["value"]) == 12
    flag = cli("--database-url", "postgresql://amy:pw2@other/db", "context")
    assert flag.exit_code == ExitCode.OK
    assert "postgresql://amy@other/db  (--database-url)" in flag.stdout
    assert "s3cret-pw" not in done.stdout + flag.stdout and "pw2" not in flag.stdout


def test_context_on_the_embedded_default_starts_nothing(
    cli: CLI, home_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOWER_DATABASE_URL")
    done = cli("context", "--json")
    assert done.exit_code == ExitCode.OK, done.stderr
    doc = json.loads(done.stdout)
    assert doc["database"]["value"] is None and "stopped" in doc["database"]["source"]
    assert doc["rootKeyId"]["value"] is None  # no key yet, and none made
    assert not home_key.exists()


def test_db_url_and_status_say_another_database_is_configured_and_start_nothing(
    cli: CLI, tower_env: dict[str, str]
) -> None:
    home = Path(tower_env["TOWER_HOME"])
    refused = cli("db", "url")
    assert refused.exit_code == ExitCode.BAD_INPUT
    assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert "TOWER_DATABASE_URL names another database" in refused.stderr
    assert "towerctl context" in refused.stderr
    status = cli("db", "status", "--json")
    assert status.exit_code == ExitCode.OK
    doc = json.loads(status.stdout)
    assert doc["running"] is False and doc["configuredBy"] == "TOWER_DATABASE_URL"
    plain = cli("db", "status")
    assert "commands use another database" in plain.stdout
    assert not (home / "pgdata" / "PG_VERSION").exists()


def test_read_and_verify_commands_never_create_a_key(
    cli: CLI, home_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_ROOT_KEY", "c3" * 32)
    session = open_session(cli)
    monkeypatch.delenv("TOWER_ROOT_KEY")
    for args in (
        ("macaroon", "verify", session.macaroon),
        ("session", "messages", session.id, "--macaroon", session.macaroon),
        ("session", "request", session.id, "hi", "--macaroon", session.macaroon),
        ("macaroon", "revoke", session.macaroon),
    ):
        done = cli(*args)
        assert done.exit_code == ExitCode.UNAUTHORIZED, (args, done.stderr)
        assert "no root key" in done.stderr and "TOWER_ROOT_KEY_FILE" in done.stderr
        assert not (home_key / "root.key").exists()
    assert cli("key", "show").exit_code == ExitCode.NOT_FOUND
    assert not (home_key / "root.key").exists()


def test_a_token_of_another_key_says_how_to_point_at_it(
    cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_ROOT_KEY", "d4" * 32)
    done = cli("macaroon", "verify", session.macaroon)
    assert done.exit_code == ExitCode.UNAUTHORIZED
    assert "unknown root key" in done.stderr and "TOWER_ROOT_KEY_FILE" in done.stderr


@pytest.fixture
def session(cli: CLI) -> OpenedSession:
    return open_session(cli)


def test_key_rotate_keeps_old_tokens_verifying_and_mints_with_the_new_key(
    cli: CLI, home_key: Path
) -> None:
    before = open_session(cli)  # creates the home's key
    old_id = cli("key", "show").stdout.strip()
    assert len(old_id) == 12
    rotated = cli("key", "rotate", "--json")
    assert rotated.exit_code == ExitCode.OK, rotated.stderr
    doc = json.loads(rotated.stdout)
    assert doc["previousKeyId"] == old_id and doc["keyId"] != old_id
    assert cli("key", "show").stdout.strip() == doc["keyId"]
    for name in ("root.key", "old-root.keys"):
        assert stat.S_IMODE((home_key / name).stat().st_mode) == 0o600, name
    assert sorted(p.name for p in home_key.iterdir() if p.name.endswith(("key", "keys"))) == [
        "old-root.keys",
        "root.key",
    ]
    assert cli("macaroon", "verify", before.macaroon).exit_code == ExitCode.OK
    fresh = cli("macaroon", "mint", before.id).stdout.strip()
    inspected = json.loads(cli("macaroon", "inspect", fresh, "--json").stdout)
    assert inspected["keyId"] == doc["keyId"]
    # A second rotation keeps both older keys.
    assert cli("key", "rotate").exit_code == ExitCode.OK
    assert cli("macaroon", "verify", before.macaroon).exit_code == ExitCode.OK
    assert cli("macaroon", "verify", fresh).exit_code == ExitCode.OK
    shown = json.loads(cli("key", "show", "--json").stdout)
    assert shown["oldKeyIds"] == [old_id, doc["keyId"]]


def test_key_rotate_refuses_a_key_kept_elsewhere(
    cli: CLI, tower_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = cli("key", "rotate")
    assert done.exit_code == ExitCode.BAD_INPUT
    assert "TOWER_ROOT_KEY" in done.stderr and tower_env["TOWER_ROOT_KEY"] not in done.stderr
    key_file = tmp_path / "k.hex"
    key_file.write_text("e5" * 32 + "\n")
    os.chmod(key_file, 0o600)
    monkeypatch.delenv("TOWER_ROOT_KEY")
    monkeypatch.setenv("TOWER_ROOT_KEY_FILE", str(key_file))
    assert cli("key", "rotate").exit_code == ExitCode.BAD_INPUT
    assert key_file.read_text() == "e5" * 32 + "\n"


def test_tower_macaroon_file_names_the_token_file(
    cli: CLI, session: OpenedSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "user.token"
    token_file.write_text(session.macaroon + "\n")
    token_file.chmod(0o600)
    monkeypatch.setenv("TOWER_MACAROON_FILE", str(token_file))
    done = cli("session", "messages", session.id, "--format", "json")
    assert done.exit_code == ExitCode.OK, done.stderr
    assert json.loads(done.stdout)["sessionId"] == session.id
    monkeypatch.setenv("TOWER_MACAROON_FILE", str(tmp_path / "missing"))
    missing = cli("session", "messages", session.id)
    assert missing.exit_code == ExitCode.BAD_INPUT
    assert "TOWER_MACAROON_FILE" in missing.stderr


@pytest.mark.parametrize("where", ["dir", "env", "local"])
def test_migrate_new_writes_into_your_folder(
    where: str, cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["migrate", "new", "add_index"]
    if where == "dir":
        args += ["--dir", str(folder)]
    elif where == "env":
        monkeypatch.setenv("TOWER_MIGRATIONS_DIR", str(folder))
    done = cli(*args)
    assert done.exit_code == ExitCode.OK, done.stderr
    assert (folder / "0001_add_index.sql").read_text() == ""
    assert Path(done.stdout.strip()).resolve() == folder / "0001_add_index.sql"


def test_migrate_new_without_a_folder_writes_nothing(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    done = cli("migrate", "new", "add_index")
    assert done.exit_code == ExitCode.BAD_INPUT
    assert "./migrations" in done.stderr and len(done.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_migrate_new_never_writes_into_an_installed_package(
    tower_env: dict[str, str], tmp_path: Path
) -> None:
    """An install's layout (the package with its sql/ inside), read-only as a system
    site-packages is: `migrate new` pointed at the packaged folder is refused."""
    import shutil
    import subprocess
    import sys

    import towerctl

    site = tmp_path / "site"
    package = site / "towerctl"
    shutil.copytree(Path(towerctl.__file__).parent, package)  # an install holds sql/ already
    shutil.copytree(Path(__file__).parents[2] / "sql", package / "sql", dirs_exist_ok=True)
    for path in [site, *site.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        env = {**os.environ, **tower_env, "PYTHONPATH": str(site)}
        env.pop("TOWER_MIGRATIONS_DIR", None)
        before = sorted(p.name for p in (package / "sql").iterdir())
        for extra in (["--dir", str(package / "sql")], []):
            done = subprocess.run(
                [sys.executable, "-m", "towerctl", "migrate", "new", "add_index", *extra],
                env={
                    **env,
                    **({"TOWER_MIGRATIONS_DIR": str(package / "sql")} if not extra else {}),
                },
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == ExitCode.BAD_INPUT, done.stderr
            assert "installed with towerctl" in done.stderr
        assert sorted(p.name for p in (package / "sql").iterdir()) == before
    finally:
        for path in [site, *site.rglob("*")]:
            path.chmod(0o755)
