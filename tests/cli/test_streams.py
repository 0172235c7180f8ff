"""Streams and writes that fail (SPEC 11 "Pipes and writes", issue 11).

For every format, on a transcript of a few MB (far past any pipe or socket buffer):
a reader that goes away (`head -c`, `less` quitting on a real pseudo-terminal), a
full device (/dev/full), a full file system with `-o` (a 64 KiB tmpfs), SIGINT and
SIGTERM part way, and the server's backend terminated part way. After each: the exit
code the contract names, no hang (timeouts everywhere), no `.part` file, the target
unchanged, and no connection of the test database idle in transaction.
"""

from __future__ import annotations

import contextlib
import os
import pty
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import CLI, OpenedSession, open_session
from faults import mounted_tmpfs
from terminal import read_pty
from towerctl.cli.outfile import remove_stale_parts
from towerctl.cli.output import TERMINATING_SIGNALS
from towerctl.errors import ExitCode
from towerctl.transcripts import Format

FORMATS = [f.value for f in Format]
MESSAGES = 4_000
FILLER = 600  # characters per message: about 2.5 MB of transcript
TOWERCTL = [sys.executable, "-m", "towerctl"]
PREVIOUS = b"previous export, must survive\n"
SIGINT_EXIT, SIGTERM_EXIT = 130, 143
EACH_SIGNAL = pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, SIGINT_EXIT), (signal.SIGTERM, SIGTERM_EXIT)]
)


def seed(conn: psycopg.Connection, session_id: str, count: int = MESSAGES) -> None:
    """`count` messages inserted directly: fast, and well past every buffer."""
    rid = conn.execute(
        "INSERT INTO session_requests (session_id, state, agent) VALUES (%s, 'complete', 'echo')"
        " RETURNING id",
        (session_id,),
    ).fetchone()
    assert rid is not None
    conn.execute(
        "INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)"
        " SELECT %s, CASE WHEN g %% 2 = 1 THEN 'user' ELSE 'assistant' END,"
        "  'message ' || g || ': ' || repeat('lorem ipsum ', %s), %s, 1"
        " FROM generate_series(1, %s) g",
        (session_id, FILLER // 12, rid[0], count),
    )


@pytest.fixture
def big(cli: CLI, conn: psycopg.Connection) -> OpenedSession:
    s = open_session(cli)
    seed(conn, s.id)
    return s


def command(s: OpenedSession, fmt: str, *extra: str) -> list[str]:
    return [*TOWERCTL, "session", "messages", s.id, "--format", fmt, "--macaroon", s.macaroon,
            *extra]  # fmt: skip


def environment(tower_env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **tower_env}


def piped(argv: list[str], tower_env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`argv` under way, its stdout and stderr on pipes."""
    return subprocess.Popen(
        argv, env=environment(tower_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def streaming(
    s: OpenedSession, fmt: str, tower_env: dict[str, str], *extra: str
) -> subprocess.Popen[bytes]:
    """The export under way, its stdout and stderr on pipes."""
    return piped(command(s, fmt, *extra), tower_env)


def assert_head_ends_it_quietly(argv: list[str], tower_env: dict[str, str]) -> None:
    """`argv | head -c 100`: head shows 100 bytes, then `argv` exits 0 with nothing on stderr."""
    proc = piped(argv, tower_env)
    assert proc.stdout is not None and proc.stderr is not None
    head = subprocess.Popen(["head", "-c", "100"], stdin=proc.stdout, stdout=subprocess.PIPE)
    proc.stdout.close()  # head holds the only read end now
    shown, _ = head.communicate(timeout=30)
    assert len(shown) == 100
    assert proc.wait(timeout=30) == ExitCode.OK, proc.stderr.read()
    assert proc.stderr.read() == b""


def towerctl_backends(conn: psycopg.Connection) -> list[tuple[int, str]]:
    return conn.execute(
        "SELECT pid, coalesce(state, '') FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name = 'towerctl'"
    ).fetchall()


def assert_nothing_left_open(conn: psycopg.Connection) -> None:
    """No towerctl connection left on the server, and none was ever seen idle in transaction."""
    deadline = time.monotonic() + 10
    while True:
        rows = towerctl_backends(conn)
        assert not [r for r in rows if r[1].startswith("idle in transaction")], rows
        if not rows:
            return
        assert time.monotonic() < deadline, f"towerctl backends still there: {rows}"
        time.sleep(0.05)


def only_target(folder: Path, name: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [name], "a temporary file was left"


def assert_target_kept(target: Path, conn: psycopg.Connection) -> None:
    """The previous export is still there, alone (no temporary file), and nothing open."""
    assert target.read_bytes() == PREVIOUS
    only_target(target.parent, target.name)
    assert_nothing_left_open(conn)


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert "Traceback" not in text
    return text


# --- a reader that goes away -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_head_closing_early_ends_quietly(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection
) -> None:
    assert_head_ends_it_quietly(command(big, fmt), tower_env)
    assert_nothing_left_open(conn)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_less_quitting_on_a_terminal_ends_quietly(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection,
    tmp_path: Path,
) -> None:  # fmt: skip
    status = tmp_path / "status"
    line = " ".join(f"'{a}'" for a in command(big, fmt))
    script = f"{line} 2>{tmp_path}/stderr | less; echo ${{PIPESTATUS[0]}} > {status}"
    env = {**environment(tower_env), "TERM": "xterm", "LESS": "", "LESSHISTFILE": "-",
           "LINES": "24", "COLUMNS": "80"}  # fmt: skip
    pid, master = pty.fork()
    if pid == 0:  # the child: bash with the pty as its controlling terminal
        os.execve("/bin/bash", ["bash", "-c", script], env)
    try:
        seen = read_pty(master, 30, until=lambda data: len(data) > 200)
        assert len(seen) > 200, seen
        os.write(master, b"q")
        read_pty(master, 30)  # until bash ends (EIO)
        assert _wait(pid, timeout=30) == 0
    finally:
        os.close(master)
    assert status.read_text().strip() == str(ExitCode.OK.value)
    assert (tmp_path / "stderr").read_bytes() == b""
    assert_nothing_left_open(conn)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the shell running towerctl | less did not end")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_reader_gone_before_the_first_byte(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(os.devnull, "rb") as nothing:
        proc = subprocess.run(
            command(big, fmt), env=environment(tower_env), stdin=nothing, stdout=write_end,
            stderr=subprocess.PIPE, timeout=30,
        )  # fmt: skip
    os.close(write_end)
    assert proc.returncode == ExitCode.OK
    assert proc.stderr == b""
    assert_nothing_left_open(conn)


# --- a write that fails -------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_device_exits_10(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection
) -> None:
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            command(big, fmt), env=environment(tower_env), stdout=full, stderr=subprocess.PIPE,
            timeout=30,
        )  # fmt: skip
    assert proc.returncode == ExitCode.WRITE_FAILED
    assert "cannot write to standard output: No space left on device" in one_line(proc.stderr)
    assert_nothing_left_open(conn)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (needs root: skipped with the reason otherwise)."""
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as folder:
        yield folder


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_file_system_exits_10_and_keeps_the_target(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection,
    tiny_fs: Path,
) -> None:  # fmt: skip
    target = tiny_fs / f"out.{fmt}"
    target.write_bytes(PREVIOUS)
    proc = subprocess.run(
        command(big, fmt, "-o", str(target)), env=environment(tower_env),
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == ExitCode.WRITE_FAILED
    assert f"cannot write {target}: No space left on device" in one_line(proc.stderr)
    assert_target_kept(target, conn)


# --- signals and a lost server part way -----------------------------------------------


@contextlib.contextmanager
def messages_locked(db_url: str) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on session_messages: an export that has created its
    `.part` file then waits, part way, for its first row."""
    with psycopg.connect(db_url) as locker:
        locker.execute("LOCK TABLE session_messages IN ACCESS EXCLUSIVE MODE")
        yield
        locker.rollback()


def wait_for_part_and_lock(folder: Path, conn: psycopg.Connection, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate(timeout=30)
        parts = [p for p in folder.iterdir() if p.name.endswith(".part")]
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'towerctl' AND wait_event_type = 'Lock'"
        ).fetchone()
        if parts and waiting and waiting[0] == 1:
            return
        time.sleep(0.02)
    raise AssertionError("the export never reached its .part file and the locked table")


@contextlib.contextmanager
def exporting_to_a_file(
    big: OpenedSession, fmt: str, tower_env: dict[str, str], conn: psycopg.Connection,
    db_url: str, tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:  # fmt: skip
    """An export with `-o` over a previous one in a folder of its own, held part way (its
    `.part` file made, waiting for the locked table): (the process, the target)."""
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / f"out.{fmt}"
    target.write_bytes(PREVIOUS)
    with messages_locked(db_url):
        proc = streaming(big, fmt, tower_env, "-o", str(target))
        wait_for_part_and_lock(folder, conn, proc)
        yield proc, target


@pytest.mark.timeout(60)
@EACH_SIGNAL
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_signal_during_an_export_to_a_file(
    fmt: str, sig: int, code: int, big: OpenedSession, tower_env: dict[str, str],
    conn: psycopg.Connection, db_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    with exporting_to_a_file(big, fmt, tower_env, conn, db_url, tmp_path) as (proc, target):
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert out == b"" and b"Traceback" not in err
    assert_target_kept(target, conn)


# Every other signal whose default action ends the process (the one a dropped ssh
# connection sends among them), and the first and last real-time signals.
OTHER_TERMINATING = sorted(
    {*TERMINATING_SIGNALS, signal.SIGRTMIN, signal.SIGRTMAX}
    - {signal.SIGTERM, *range(signal.SIGRTMIN + 1, signal.SIGRTMAX)}
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", OTHER_TERMINATING, ids=lambda s: signal.Signals(s).name)
def test_every_terminating_signal_during_an_export_to_a_file(
    sig: int, big: OpenedSession, tower_env: dict[str, str],
    conn: psycopg.Connection, db_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    with exporting_to_a_file(big, "ndjson", tower_env, conn, db_url, tmp_path) as (proc, target):
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert out == b"" and b"Traceback" not in err
    assert_target_kept(target, conn)


@pytest.mark.timeout(60)
@EACH_SIGNAL
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_signal_while_streaming_to_a_pipe(
    fmt: str, sig: int, code: int, big: OpenedSession, tower_env: dict[str, str],
    conn: psycopg.Connection,
) -> None:  # fmt: skip
    proc = streaming(big, fmt, tower_env)
    assert proc.stdout is not None
    assert len(proc.stdout.read(100)) == 100  # the export is under way (and blocks on the pipe)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    assert_nothing_left_open(conn)


def terminate_towerctl(conn: psycopg.Connection) -> int:
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'towerctl' AND pid <> pg_backend_pid()"
    ).fetchall()
    return len(rows)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_server_lost_while_streaming_exits_8(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection
) -> None:
    proc = streaming(big, fmt, tower_env)
    assert proc.stdout is not None
    first = proc.stdout.read(100)
    assert len(first) == 100
    assert terminate_towerctl(conn) == 1
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.UNREACHABLE, (len(rest), err)
    assert "lost the database connection" in one_line(err)
    # Whether the tail was cut depends on how much the server had already put in the
    # socket before its backend ended (under load, sometimes all of it): not asserted.
    assert_nothing_left_open(conn)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_server_lost_during_an_export_to_a_file(
    fmt: str, big: OpenedSession, tower_env: dict[str, str], conn: psycopg.Connection,
    db_url: str, tmp_path: Path,
) -> None:  # fmt: skip
    with exporting_to_a_file(big, fmt, tower_env, conn, db_url, tmp_path) as (proc, target):
        assert terminate_towerctl(conn) == 1
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.UNREACHABLE, err
    assert "lost the database connection" in one_line(err)
    assert_target_kept(target, conn)


# --- -o: stdout, links, leftovers ----------------------------------------------------


@pytest.mark.timeout(60)
def test_dash_o_dash_is_stdout(
    cli: CLI, big: OpenedSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("session", "messages", big.id, "--format", "ndjson", "-o", "-",
                 "--macaroon", big.macaroon)  # fmt: skip
    assert result.exit_code == ExitCode.OK
    assert len(result.stdout.splitlines()) == MESSAGES
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small(cli: CLI, conn: psycopg.Connection) -> OpenedSession:
    s = open_session(cli)
    seed(conn, s.id, count=3)
    return s


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["/dev/stdout", "/proc/self/fd/1", "/dev/fd/1", "linked"])
def test_dash_o_naming_stdout_appends_to_the_log_it_is_redirected_to(
    name: str, small: OpenedSession, tower_env: dict[str, str], tmp_path: Path
) -> None:
    """`(echo before; towerctl ... -o /dev/stdout; echo after) >> cron.log` keeps the log."""
    log = tmp_path / "cron.log"
    log.write_text("earlier line\n")
    log.chmod(0o644)
    if name == "linked":  # a link of the user's own to the device
        (tmp_path / "linked").symlink_to("/dev/stdout")
        name = str(tmp_path / "linked")
    export = " ".join(command(small, "ndjson", "-o", name))
    script = f"(echo before; {export}; echo after) >> {log}"
    done = subprocess.run(["bash", "-c", script], env=environment(tower_env),
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert lines[:2] == ["earlier line", "before"] and lines[-1] == "after"
    assert len(lines) == 3 + 3
    assert stat.S_IMODE(log.stat().st_mode) == 0o644
    assert {p.name for p in tmp_path.iterdir()} <= {"cron.log", "linked"}  # nothing left


@pytest.mark.timeout(60)
def test_dash_o_naming_stdout_into_a_pipe_and_stderr_write_the_stream(
    small: OpenedSession, tower_env: dict[str, str]
) -> None:
    done = subprocess.run(command(small, "ndjson", "-o", "/proc/self/fd/1"),
                          env=environment(tower_env), capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == ExitCode.OK, done.stderr
    assert len(done.stdout.splitlines()) == 3
    done = subprocess.run(command(small, "csv", "-o", "/dev/stderr"),
                          env=environment(tower_env), capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stdout == b"" and done.stderr.startswith(b"id,role,content")


@pytest.mark.timeout(60)
def test_dash_o_naming_a_device_writes_to_it(
    small: OpenedSession, tower_env: dict[str, str]
) -> None:
    done = subprocess.run(command(small, "json", "-o", "/dev/null"),
                          env=environment(tower_env), capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == ExitCode.OK, done.stderr
    assert os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    done = subprocess.run(command(small, "json", "-o", "/dev/full"),
                          env=environment(tower_env), capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == ExitCode.WRITE_FAILED
    assert "No space left" in one_line(done.stderr)


@pytest.mark.timeout(60)
def test_a_link_planted_by_another_user_is_refused(
    cli: CLI, big: OpenedSession, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("planting a link owned by another user needs root")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    precious = tmp_path / "precious"
    precious.write_bytes(PREVIOUS)
    link = sticky / "out.json"
    link.symlink_to(precious)
    os.lchown(link, 65534, 65534)
    result = cli("session", "messages", big.id, "--format", "json", "-o", str(link),
                 "--macaroon", big.macaroon)  # fmt: skip
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "owned by another user" in result.stderr
    assert precious.read_bytes() == PREVIOUS and link.is_symlink()
    # A planted link to a folder on the way is refused the same.
    folder_link = sticky / "dir"
    folder_link.symlink_to(tmp_path)
    os.lchown(folder_link, 65534, 65534)
    result = cli("session", "messages", big.id, "-o", str(folder_link / "precious"),
                 "--macaroon", big.macaroon)  # fmt: skip
    assert result.exit_code == ExitCode.BAD_INPUT
    assert precious.read_bytes() == PREVIOUS


@pytest.mark.timeout(60)
def test_leftovers_of_a_killed_export_are_removed_by_the_next(
    cli: CLI, big: OpenedSession, tmp_path: Path
) -> None:
    target = tmp_path / "out.json"
    dead = _dead_pid()
    stale = tmp_path / f".out.json.{dead}.abcd1234.part"
    stale.write_bytes(b"half")
    alive = tmp_path / f".out.json.{os.getpid()}.efgh5678.part"  # a live export's
    alive.write_bytes(b"busy")
    other = tmp_path / ".other.json.1.abcd1234.part"  # another target's
    other.write_bytes(b"x")
    result = cli("session", "messages", big.id, "--format", "json", "-o", str(target),
                 "--macaroon", big.macaroon)  # fmt: skip
    assert result.exit_code == ExitCode.OK
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [alive.name, other.name, target.name]
    )
    if os.geteuid() == 0:  # another user's leftover is not ours to remove
        foreign = tmp_path / f".out.json.{dead}.zzzz0000.part"
        foreign.write_bytes(b"theirs")
        os.chown(foreign, 65534, 65534)
        assert remove_stale_parts(str(target)) == []
        assert foreign.exists()


def _dead_pid() -> int:
    """A pid no process can have: above the kernel's pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1_000


@pytest.mark.timeout(90)
def test_a_huge_message_in_a_table_is_cut_with_memory_flat(
    cli: CLI, conn: psycopg.Connection, tower_env: dict[str, str]
) -> None:
    s = open_session(cli)
    seed(conn, s.id, 2)
    conn.execute(
        "UPDATE session_messages SET content = repeat('ab', 50000000) WHERE session_id = %s"
        " AND id = (SELECT min(id) FROM session_messages WHERE session_id = %s)",
        (s.id, s.id),
    )
    code = (
        "import resource, subprocess, sys;"
        "p = subprocess.run(sys.argv[1:], capture_output=True, timeout=60);"
        "sys.stdout.buffer.write(p.stdout);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
        "sys.exit(p.returncode)"
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, *command(s, "table")], env=environment(tower_env),
        capture_output=True, timeout=80,
    )  # fmt: skip
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert time.monotonic() - started < 30
    text = proc.stdout.decode()
    assert "[cut: 99,998,000 more characters; use --format json]" in " ".join(text.split())
    assert len(text) < 20_000
    peak_kib = int(proc.stderr.decode().split()[-1])
    assert peak_kib < 150_000, f"{peak_kib} KiB"


# --- listings other than transcripts ---------------------------------------------------


@pytest.mark.timeout(60)
def test_session_list_ends_quietly_when_the_reader_goes(
    conn: psycopg.Connection, tower_env: dict[str, str]
) -> None:
    conn.execute(
        "INSERT INTO sessions (state, balance_sats)"
        " SELECT 'active', g FROM generate_series(1, 10000) g"
    )
    for args in (
        ["session", "list", "--limit", "10000"],
        ["session", "list", "--limit", "10000", "--json"],
    ):
        _assert_head_is_quiet(args, tower_env)


@pytest.mark.timeout(60)
def test_migrate_status_ends_quietly_when_the_reader_goes(
    tower_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    for n in range(1, 4_001):
        (folder / f"{n:05d}_a_fairly_long_migration_name_{n}.sql").write_text("SELECT 1;\n")
    for extra in ([], ["--json"]):
        _assert_head_is_quiet(["migrate", "status", "--dir", str(folder), *extra], tower_env)


@pytest.mark.timeout(60)
def test_macaroon_inspect_ends_quietly_when_the_reader_is_gone(
    cli: CLI, tower_env: dict[str, str]
) -> None:
    s = open_session(cli)
    for extra in ([], ["--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        proc = subprocess.run(
            [*TOWERCTL, "macaroon", "inspect", s.macaroon, *extra], env=environment(tower_env),
            stdout=write_end, stderr=subprocess.PIPE, timeout=30,
        )  # fmt: skip
        os.close(write_end)
        assert proc.returncode == ExitCode.OK, proc.stderr
        assert proc.stderr == b""


def _assert_head_is_quiet(args: list[str], tower_env: dict[str, str]) -> None:
    assert_head_ends_it_quietly([*TOWERCTL, *args], tower_env)
    # And with the reader gone before the first byte (output of any size).
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run(
        [*TOWERCTL, *args], env=environment(tower_env), stdout=write_end,
        stderr=subprocess.PIPE, timeout=30,
    )  # fmt: skip
    os.close(write_end)
    assert done.returncode == ExitCode.OK, done.stderr
    assert done.stderr == b""


# --- closed standard streams: the exit code still tells -----------------------------------------

UNREACHABLE = "postgresql://towerctl@127.0.0.1:1/nothing?connect_timeout=2"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("closed", [">&-", "2>&-", ">&- 2>&-"])
@pytest.mark.parametrize("command", ["migrate", "migrate status"])
def test_an_unreachable_database_exits_8_with_a_standard_stream_closed(
    closed: str, command: str
) -> None:
    """Started with stdout and/or stderr closed (a cron line's `>&-`): the unreachable
    database is still exit 8, never a traceback's 1."""
    towerctl = Path(sys.executable).with_name("towerctl")
    done = subprocess.run(
        ["bash", "-c", f"{towerctl} {command} {closed}"],
        env={**os.environ, "TOWER_DATABASE_URL": UNREACHABLE},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == ExitCode.UNREACHABLE, done.stderr


@pytest.mark.timeout(60)
def test_a_json_error_to_a_full_device_keeps_its_exit_code() -> None:
    """The error document of a `--json` command that failed cannot be written either
    (/dev/full): stderr has the line, the exit code is the error's own."""
    towerctl = Path(sys.executable).with_name("towerctl")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [str(towerctl), "session", "show", "nonsense", "--json"],
            env={**os.environ, "TOWER_DATABASE_URL": UNREACHABLE},
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    assert done.returncode == ExitCode.BAD_INPUT, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
