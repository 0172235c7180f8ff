"""A batch's bursts: an echo batch's writes wait for the disk together, and an outcome
line is written only once its request is on disk (towerctl.batch.Outbox)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import faults
from conftest import CLI, ROOT_KEY_HEX, OpenedSession, open_session
from towerctl import bounds
from towerctl.errors import ExitCode, NotServed

# --- the reader's readiness -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_ready_says_whether_the_next_line_waits_for_the_writer() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as stream:
        lines = bounds.BoundedLines(stream, 8)
        assert not lines.ready()  # nothing written: the next line would wait
        os.write(write_end, b"one\ntw")
        assert lines.ready()
        assert next(lines) == b"one\n"
        assert not lines.ready()  # half a line: the rest would wait
        os.write(write_end, b"o\n" + b"x" * 20)
        assert lines.ready()
        assert next(lines) == b"two\n"
        assert lines.ready()  # a line past the bound is here: next() says so at once
        with pytest.raises(bounds.LineTooLong):
            next(lines)
        os.close(write_end)


@pytest.mark.timeout(30)
def test_the_end_of_input_is_ready() -> None:
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as stream:
        lines = bounds.BoundedLines(stream, 8)
        os.write(write_end, b"last")
        assert not lines.ready()
        os.close(write_end)
        assert lines.ready()
        assert next(lines) == b"last"
        with pytest.raises(StopIteration):
            next(lines)


# --- a writer that waits for each answer ----------------------------------------------------


def _read_line(fd: int, timeout: float) -> bytes:
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no answer within {timeout}s (so far {line!r})")
        byte = os.read(fd, 1)
        assert byte, "towerctl closed its output"
        line += byte
    return line


class _CoProcess:
    """A batch fed by a writer that waits for answers: `send` lines, read each `answer`."""

    def __init__(self, s: OpenedSession) -> None:
        self.proc = subprocess.Popen(
            [*faults.TOWERCTL, "session", "request", s.id, "--batch", "--macaroon", s.macaroon],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        doc: dict[str, Any] = json.loads(_read_line(self.proc.stdout.fileno(), 20))
        return doc

    def finish(self) -> int:
        """Close the input; the exit code (`co_process` kills one that outlives its test)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)


@contextlib.contextmanager
def co_process(s: OpenedSession) -> Iterator[_CoProcess]:
    batch = _CoProcess(s)
    try:
        yield batch
    finally:
        if batch.proc.poll() is None:
            batch.proc.kill()
            batch.proc.wait()


@pytest.mark.timeout(90)
def test_each_answer_comes_before_the_next_line_is_sent(
    tower_env: dict[str, str], cli: CLI
) -> None:
    """A writer that sends a line and waits for its answer (a co-process) gets it: a
    line whose successor is not there yet waits for the disk and is answered at once."""
    with co_process(open_session(cli, 1_000_000)) as batch:
        for n in range(12):
            batch.send(b'{"message": "turn %d"}\n' % n)
            answer = batch.answer()
            assert answer["result"] == f"turn {n}" and answer["state"] == "complete"
        assert batch.finish() == ExitCode.OK


@pytest.mark.timeout(90)
def test_a_burst_ends_when_the_lines_after_it_write_nothing(
    tower_env: dict[str, str], cli: CLI
) -> None:
    """A co-process that sends a line with a blank line after it, or a line whose key is
    replayed right after it, and then waits, gets every answer: the burst is settled
    before towerctl waits for input again."""
    with co_process(open_session(cli, 1_000_000)) as batch:
        batch.send(b'{"message": "one"}\n\n')
        assert batch.answer()["result"] == "one"
        keyed = b'{"message": "two", "idempotencyKey": "k2"}\n'
        batch.send(keyed + keyed)
        first, again = batch.answer(), batch.answer()
        assert (first["replayed"], again["replayed"]) == (False, True)
        assert again["requestId"] == first["requestId"]
        assert batch.finish() == ExitCode.OK


# --- every printed outcome is on disk -----------------------------------------------------


@pytest.mark.timeout(240)
def test_every_printed_outcome_survives_a_server_crash(tmp_path: Path) -> None:
    """The server is killed (`pg_ctl -m immediate`: its WAL buffers are lost) while an
    echo batch runs in bursts; every outcome printed before is in the store after the
    restart. The WAL writer is slowed (10 s), so a commit that did not wait for the disk
    is on disk only if a later commit waited."""
    with faults.own_server() as server:
        with psycopg.connect(server.url, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET synchronous_commit = on")  # pgserver's is off
            admin.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
            admin.execute("ALTER SYSTEM SET wal_writer_flush_after = '1GB'")
            admin.execute("SELECT pg_reload_conf()")
        env = faults.process_env(
            {
                "TOWER_DATABASE_URL": server.url,
                "TOWER_HOME": str(tmp_path / "home"),
                "TOWER_ROOT_KEY": ROOT_KEY_HEX,
                "NO_COLOR": "1",
            }
        )
        assert faults.run(["migrate"], env).returncode == 0
        opened = faults.run(["session", "open", "--deposit", "100000000", "--json"], env)
        doc = json.loads(opened.stdout)
        proc = subprocess.Popen(
            [*faults.TOWERCTL, "session", "request", doc["sessionId"], "--batch",
             "--macaroon", doc["macaroon"]],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        feed = b"".join(b'{"message": "line %d"}\n' % n for n in range(50_000))

        def write_all() -> None:
            try:
                proc.stdin.write(feed)  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except (BrokenPipeError, OSError):
                pass

        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        printed = [json.loads(_read_line(proc.stdout.fileno(), 60)) for _ in range(300)]
        server.stop("immediate")
        rest, err = proc.communicate(timeout=60)
        printed += [json.loads(line) for line in rest.splitlines() if line.endswith(b"}")]
        assert proc.returncode == ExitCode.UNREACHABLE, err
        server.start()
        with psycopg.connect(server.url, autocommit=True) as c:
            kept = {row[0] for row in c.execute("SELECT id FROM session_requests")}
    ids = [o["requestId"] for o in printed]
    assert len(ids) >= 300 and len(set(ids)) == len(ids)
    lost = sorted(set(ids) - kept)
    assert not lost, f"{len(lost)} printed outcomes are not in the store: {lost[:5]}..."


# --- settling beside the batch (batch.Settler) ------------------------------------------------


def _batch_in_process(
    db_url: str,
    session_id: str,
    lines: int,
    settle_beside: Any,
    *,
    on_line: Any = None,
    limits: Any = None,
    out: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`run_batch` of `lines` echo lines from a pipe written at once (every next line
    ready), as the command runs it; the outcome lines, in order (`on_line(out)` after
    each is written)."""
    from uuid import UUID

    from towerctl import db
    from towerctl.agents import EchoAgent
    from towerctl.batch import run_batch

    out = [] if out is None else out

    def emit(doc: dict[str, Any]) -> None:
        out.append(doc)
        if on_line is not None:
            on_line(out)

    feed = b"".join(b'{"message": "line %d"}\n' % n for n in range(lines))
    read_end, write_end = os.pipe()
    threading.Thread(target=lambda: (os.write(write_end, feed), os.close(write_end))).start()
    with os.fdopen(read_end, "rb") as stream, db.connect(db_url) as conn:
        run_batch(
            conn,
            UUID(session_id),
            bounds.BoundedLines(stream, 4096),
            EchoAgent(),
            emit,
            settle_beside=settle_beside,
            limits=limits,
        )
    return out


def _assert_all_answered(out: list[dict[str, Any]], lines: int) -> None:
    assert [o["result"] for o in out] == [f"line {n}" for n in range(lines)]
    assert all(o["state"] == "complete" for o in out)


@pytest.mark.timeout(120)
def test_a_batch_waits_for_the_disk_on_a_second_connection(db_url: str, cli: CLI) -> None:
    """An echo batch settles its lines beside itself: the second connection's settles run
    while the batch writes, and every line is answered, in order."""
    from towerctl import db
    from towerctl.request_chain import Settler

    s = open_session(cli, deposit=10_000_000)
    opened: list[psycopg.Connection] = []
    started: list[int] = []
    real_start = Settler.start

    def counting_start(self: Settler, session_id: Any, request_id: int) -> bool:
        started.append(request_id)
        return real_start(self, session_id, request_id)

    def second() -> psycopg.Connection:
        opened.append(db.connect(db_url, application_name="towerctl-settle"))
        return opened[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Settler, "start", counting_start)
        out = _batch_in_process(db_url, s.id, 400, second)
    _assert_all_answered(out, 400)
    assert len(opened) == 1, "one second connection for the whole batch"
    assert opened[0].closed, "the batch closes its second connection"
    assert len(started) >= 400 // 32, f"only {len(started)} settles beside the batch"
    assert started == sorted(started), "each settle covers a later request"


@pytest.mark.timeout(120)
def test_a_batch_settles_on_its_own_connection_when_the_second_fails(db_url: str, cli: CLI) -> None:
    """The second connection is an optimisation: a batch that cannot open it, or whose
    second connection dies mid-batch, still answers every line."""
    from towerctl import db
    from towerctl.errors import DatabaseUnreachable

    s = open_session(cli, deposit=10_000_000)

    def refused() -> psycopg.Connection:
        raise DatabaseUnreachable("no second connection")

    _assert_all_answered(_batch_in_process(db_url, s.id, 200, refused), 200)

    killed: list[int] = []

    def dies_soon() -> psycopg.Connection:
        second = db.connect(db_url, application_name="towerctl-settle")
        pid = second.info.backend_pid

        def kill() -> None:
            time.sleep(0.05)
            with psycopg.connect(db_url, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            killed.append(pid)

        threading.Thread(target=kill).start()
        return second

    _assert_all_answered(_batch_in_process(db_url, s.id, 2_000, dies_soon), 2_000)
    assert killed, "the second connection was terminated during the batch"


@pytest.mark.timeout(120)
def test_a_write_running_ahead_that_finds_its_lease_lost_is_that_lines_refusal(
    db_url: str, cli: CLI
) -> None:
    """Mid-batch, another client takes the session's lease (as if the batch's had run
    out): the first write sent after that, running ahead of its row, writes nothing and
    is its own line's refusal; every later line is refused (busy) and nothing more is
    recorded or charged."""
    from towerctl import db
    from towerctl.config import RequestLimits

    s = open_session(cli, deposit=10_000_000)
    taken: list[int] = []

    def take_the_lease(out: list[dict[str, Any]]) -> None:
        if len(out) == 40 and not taken:
            with psycopg.connect(db_url, autocommit=True) as other:
                other.execute(
                    "UPDATE sessions SET lease_owner = gen_random_uuid(),"
                    " lease_until = now() + interval '1 hour' WHERE id = %s",
                    (s.id,),
                )
            taken.append(len(out))

    def second() -> psycopg.Connection:
        return db.connect(db_url, application_name="towerctl-settle")

    out: list[dict[str, Any]] = []
    with pytest.raises(NotServed):  # the worst line's exit code: 5
        _batch_in_process(
            db_url,
            s.id,
            120,
            second,
            on_line=take_the_lease,
            limits=RequestLimits(busy_wait_seconds=0),
            out=out,
        )
    assert taken and len(out) == 120, "every line has its outcome"
    complete = [o for o in out if o["state"] == "complete"]
    refused = out[len(complete) :]
    assert complete == out[: len(complete)], "the refusals all come after the lease was taken"
    assert 40 <= len(complete) <= 40 + 32 + 1, len(complete)
    assert refused and all(o["requestId"] is None for o in refused)
    assert "lease ran out" in refused[0]["reason"], refused[0]
    assert all("busy" in o["reason"] for o in refused[1:]), refused[1]["reason"]
    with psycopg.connect(db_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT count(*), coalesce(sum(debited_sats), 0) FROM session_requests"
            " WHERE session_id = %s",
            (s.id,),
        ).fetchone()
    assert rows == (len(complete), sum(o["debitedSats"] for o in complete))


@pytest.mark.timeout(180)
def test_a_batch_running_ahead_on_a_latin1_database_keeps_its_text(
    server_url: str, tmp_path: Path
) -> None:
    """A write sent straight on libpq encodes its text as psycopg would for the database's
    encoding: on a LATIN1 database every accented line is answered and stored as sent."""
    from uuid import uuid4

    from psycopg.conninfo import make_conninfo

    name = f"towerctl_latin1_{uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'LATIN1'"
            " LOCALE_PROVIDER libc LOCALE 'C'"
        )
    try:
        url = make_conninfo(server_url, dbname=name)
        env = faults.process_env(
            {
                "TOWER_DATABASE_URL": url,
                "TOWER_HOME": str(tmp_path / "home"),
                "TOWER_ROOT_KEY": ROOT_KEY_HEX,
                "NO_COLOR": "1",
            }
        )
        assert faults.run(["migrate"], env).returncode == 0
        opened = json.loads(
            faults.run(["session", "open", "--deposit", "10000000", "--json"], env).stdout
        )
        lines = [f"café n°{n}: crème brûlée, naïve façade, señor, Straße ±½" for n in range(200)]
        feed = "".join(json.dumps({"message": m}) + "\n" for m in lines).encode()
        done = subprocess.run(
            [*faults.TOWERCTL, "session", "request", opened["sessionId"], "--batch",
             "--macaroon", opened["macaroon"]],
            input=feed, env=env, capture_output=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        out = [json.loads(line) for line in done.stdout.splitlines()]
        assert [o["result"] for o in out] == lines
        with psycopg.connect(url, autocommit=True) as c:
            assert c.info.encoding == "iso8859-1"
            stored = [
                row[0]
                for row in c.execute(
                    "SELECT content FROM session_messages WHERE role = 'user' ORDER BY id"
                )
            ]
        assert stored == lines
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(60)
def test_a_settle_that_locks_no_row_is_a_failed_settle(db_url: str, cli: CLI) -> None:
    """A settle beside whose lock finds no row wrote no WAL, so its commit waited for
    nothing: it must count as failed (the batch then settles on its own connection)."""
    from uuid import UUID

    from towerctl import db
    from towerctl.request_chain import Settler

    s = open_session(cli, deposit=1_000)
    settler = Settler(lambda: db.connect(db_url, application_name="towerctl-settle"))
    try:
        assert settler.start(UUID(s.id), 987_654_321)  # no such request
        assert settler.wait() is False
        assert not settler.usable and not settler.running
    finally:
        settler.close()
