"""towerctl on a Citus cluster (opt-in: TOWER_TEST_CITUS_URL names a fresh database on a
coordinator with its workers added; `tests/conftest.py` collects this folder only then).

One store, in order: migrate, db distribute (twice: the second finds everything in
place), the README's tour through the coordinator with the results of plain
PostgreSQL, and what is refused on a cluster. How such a cluster is built is in
docs/scaling.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agents_fixtures import exec_agent
from conftest import CLI, ROOT_KEY_HEX, OpenedSession, assert_store_consistent, open_session
from terminal import TOWERCTL
from towerctl.errors import ExitCode
from towerctl.migrations.files import default_dir

URL = os.environ.get("TOWER_TEST_CITUS_URL", "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    """The coordinator's database, migrated and distributed once for the module."""
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("TOWER_") and key != "TOWER_TEST_CITUS_URL":
                patch.delenv(key)
        patch.setenv("TOWER_DATABASE_URL", URL)
        patch.setenv("TOWER_HOME", str(tmp_path_factory.mktemp("home")))
        patch.setenv("TOWER_ROOT_KEY", ROOT_KEY_HEX)
        patch.setenv("NO_COLOR", "1")
        cli = CLI()
        result = cli("migrate")
        assert result.exit_code == ExitCode.OK, result.stderr
        result = cli("db", "distribute", "--json")
        assert result.exit_code == ExitCode.OK, result.stderr
        yield cli


def steps(cli: CLI) -> list[dict[str, str]]:
    result = cli("db", "distribute", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    doc = json.loads(result.stdout)
    assert doc["citus"]
    found: list[dict[str, str]] = doc["steps"]
    return found


def test_a_second_distribute_finds_everything_in_place(cluster: CLI) -> None:
    assert {s["state"] for s in steps(cluster)} == {"in place"}
    with psycopg.connect(URL) as conn:
        placed = dict(
            conn.execute("SELECT logicalrelid::regclass::text, partmethod FROM pg_dist_partition")
        )
    assert placed["sessions"] == placed["session_messages"] == "h"
    assert placed["macaroon_revocations"] == "n"
    assert "tower_schema_migrations" not in placed


def request(cli: CLI, s: OpenedSession, message: str, *extra: str) -> dict[str, object]:
    result = cli("session", "request", s.id, message, "--macaroon", s.macaroon, "--json", *extra)
    doc: dict[str, object] = json.loads(result.stdout)
    doc["exit"] = result.exit_code
    return doc


def test_requests_and_money_as_on_postgresql(cluster: CLI) -> None:
    s = open_session(cluster, deposit=200)
    first = request(cluster, s, "What is a macaroon?")
    assert first["exit"] == ExitCode.OK and first["state"] == "complete"
    assert isinstance(first["debitedSats"], int) and first["debitedSats"] > 0
    keyed = request(cluster, s, "once", "--idempotency-key", "k-1")
    replay = request(cluster, s, "once", "--idempotency-key", "k-1")
    assert replay["replayed"] is True and replay["requestId"] == keyed["requestId"]
    lines = "".join(json.dumps({"message": f"line {i}"}) + "\n" for i in range(5))
    batch = cluster("session", "request", s.id, "--batch", "--macaroon", s.macaroon, input=lines)
    assert batch.exit_code == ExitCode.OK, batch.stderr
    assert len(batch.stdout.splitlines()) == 5
    topped = cluster("session", "topup", s.id, "--sats", "50", "--json")
    assert topped.exit_code == ExitCode.OK, topped.stderr
    poor = open_session(cluster, deposit=5)
    refused = request(cluster, poor, "x" * 400)
    assert refused["exit"] == ExitCode.NOT_SERVED
    assert_store_consistent(URL)
    full = cluster("doctor", "--full")
    assert full.exit_code == ExitCode.OK, full.stdout + full.stderr


def test_transcript_and_clear(cluster: CLI, tmp_path: Path) -> None:
    s = open_session(cluster)
    for i in range(3):
        assert request(cluster, s, f"question {i}")["exit"] == ExitCode.OK
    read = cluster("session", "messages", s.id, "--macaroon", s.macaroon, "--format", "ndjson")
    contents = [json.loads(line)["content"] for line in read.stdout.splitlines()]
    assert contents == [f"question {i}" for i in range(3) for _ in range(2)]
    cleared = cluster("session", "clear-history", s.id, "--macaroon", s.macaroon, "--yes")
    assert cleared.exit_code == ExitCode.OK, cleared.stderr
    again = cluster("session", "messages", s.id, "--macaroon", s.macaroon, "--format", "ndjson")
    assert again.stdout == ""


def test_report_equals_the_ledger(cluster: CLI) -> None:
    s = open_session(cluster, deposit=300)
    assert request(cluster, s, "counted")["exit"] == ExitCode.OK
    result = cluster("report", "--since", "1d", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    totals = json.loads(result.stdout)["totals"]
    with psycopg.connect(URL) as conn:
        sums = dict(
            conn.execute(
                "SELECT kind, sum(amount_sats) FROM balance_ledger"
                " WHERE created_at >= now() - interval '1 day' GROUP BY kind"
            ).fetchall()
        )
        requests = conn.execute("SELECT count(*) FROM session_requests").fetchone()
    assert totals["depositSats"] == sums["deposit"] and totals["debitedSats"] == sums["debit"]
    assert requests is not None and sum(totals["requests"].values()) == requests[0]


def shard_node(conn: psycopg.Connection, session_id: str) -> tuple[int, str, int]:
    """(the shard holding the session, its node's name and port)."""
    row = conn.execute(
        "SELECT s.shardid, s.nodename, s.nodeport FROM citus_shards s"
        " WHERE s.table_name = 'sessions'::regclass"
        " AND s.shardid = get_shard_id_for_distribution_column('sessions', %s::uuid)",
        (session_id,),
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1]), int(row[2])


def test_order_survives_a_shard_move(cluster: CLI, tmp_path: Path) -> None:
    """Messages written before and after the session's shard moves to the other worker:
    the transcript, --last and a --follow started before the move keep their order."""
    s = open_session(cluster, deposit=10_000)
    out = tmp_path / "follow.ndjson"
    follow = subprocess.Popen(
        [*TOWERCTL, "session", "messages", s.id, "--follow", "--format", "ndjson"],
        env=os.environ | {"TOWER_MACAROON": s.macaroon},
        stdout=out.open("wb"),
        stderr=subprocess.PIPE,
    )
    try:
        for i in range(3):
            assert request(cluster, s, f"before {i}")["exit"] == ExitCode.OK
        with psycopg.connect(URL, autocommit=True) as conn:
            shard, host, port = shard_node(conn, s.id)
            other = conn.execute(
                "SELECT nodename, nodeport FROM pg_dist_node"
                " WHERE noderole = 'primary' AND groupid > 0 AND nodeport <> %s LIMIT 1",
                (port,),
            ).fetchone()
            assert other is not None
            conn.execute(
                "SELECT citus_move_shard_placement(%s, %s, %s, %s, %s,"
                " shard_transfer_mode => 'block_writes')",
                (shard, host, port, other[0], other[1]),
            )
            assert shard_node(conn, s.id)[2] == other[1]
        for i in range(3):
            assert request(cluster, s, f"after {i}")["exit"] == ExitCode.OK
        # the context window a request sends its agent: the newest messages, in order
        agent = exec_agent(tmp_path, "context", "print(json.dumps([m['content'] for m in "
                           "conv['messages']]))")  # fmt: skip
        seen = request(cluster, s, "after 3", "--agent", agent)
        assert seen["exit"] == ExitCode.OK
        context = json.loads(str(seen["result"]))
        assert context[-5:] == ["after 1", "after 1", "after 2", "after 2", "after 3"]
        expected = [f"{w} {i}" for w in ("before", "after") for i in range(3) for _ in range(2)]
        expected += ["after 3", json.dumps(context)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(out.read_text().splitlines()) < 14:
            time.sleep(0.2)
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=30)
    followed = [json.loads(line)["content"] for line in out.read_text().splitlines()]
    assert followed == expected
    read = cluster("session", "messages", s.id, "--macaroon", s.macaroon, "--format", "ndjson")
    assert [json.loads(line)["content"] for line in read.stdout.splitlines()] == expected
    last = cluster(
        "session", "messages", s.id, "--macaroon", s.macaroon, "--format", "ndjson", "--last", "2"
    )
    assert [json.loads(line)["content"] for line in last.stdout.splitlines()] == expected[-2:]
    assert cluster("doctor").exit_code == ExitCode.OK


def test_concurrent_requests_never_overdraw(cluster: CLI) -> None:
    """Eight requests at once on a session that can pay for about three, each its own
    towerctl process through the coordinator: no overdraft, every debit in the ledger."""
    s = open_session(cluster, deposit=45)
    env = os.environ | {"TOWER_MACAROON": s.macaroon, "TOWER_BUSY_WAIT": "20"}
    message = "a question of some length, " * 4
    procs = [
        subprocess.Popen(
            [*TOWERCTL, "session", "request", s.id, message, "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(8)
    ]
    codes = [p.wait(timeout=120) for p in procs]
    for p in procs:
        assert p.stdout is not None and p.stderr is not None
        p.stdout.close()
        p.stderr.close()
    assert set(codes) <= {ExitCode.OK, ExitCode.NOT_SERVED}, codes
    assert ExitCode.OK in codes and ExitCode.NOT_SERVED in codes, codes
    with psycopg.connect(URL) as conn:
        row = conn.execute(
            "SELECT s.balance_sats, (SELECT coalesce(sum(debited_sats), 0) FROM session_requests"
            " WHERE session_id = s.id), (SELECT coalesce(sum(amount_sats), 0) FROM balance_ledger"
            " WHERE session_id = s.id AND kind = 'debit'),"
            " (SELECT count(*) FROM session_requests WHERE session_id = s.id"
            " AND state = 'complete') FROM sessions s WHERE s.id = %s",
            (s.id,),
        ).fetchone()
    assert row is not None
    balance, debited, ledger_debits, complete = row
    assert balance >= 0 and debited == ledger_debits == 45 - balance
    assert complete == codes.count(ExitCode.OK)
    assert_store_consistent(URL)


def test_a_failed_agent_is_recorded_and_not_charged(cluster: CLI, tmp_path: Path) -> None:
    s = open_session(cluster, deposit=100)
    agent = exec_agent(tmp_path, "broken", "sys.exit(3)")
    failed = request(cluster, s, "hello", "--agent", agent)
    assert failed["exit"] == ExitCode.AGENT_FAILED and failed["state"] == "failed"
    assert failed["debitedSats"] == 0
    shown = json.loads(cluster("session", "show", s.id, "--json").stdout)
    assert shown["balanceSats"] == 100


def test_purge_deletes_expired_histories_through_the_coordinator(cluster: CLI) -> None:
    s = open_session(cluster, deposit=500)
    for i in range(3):
        assert request(cluster, s, f"old {i}")["exit"] == ExitCode.OK
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(
            "UPDATE sessions SET created_at = now() - interval '20 days',"
            " last_activity_at = now() - interval '11 days',"
            " expires_at = now() - interval '10 days', state = 'expired' WHERE id = %s",
            (s.id,),
        )
    result = cluster("session", "purge", "--expired-for", "7d", "--yes", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert json.loads(result.stdout)["messages"] >= 6
    with psycopg.connect(URL) as conn:
        left = conn.execute(
            "SELECT count(*) FROM session_messages WHERE session_id = %s", (s.id,)
        ).fetchone()
        recorded = conn.execute(
            "SELECT messages_deleted FROM session_history_clears"
            " WHERE session_id = %s AND macaroon_identifier = 'purge'",
            (s.id,),
        ).fetchone()
    assert left == (0,) and recorded == (6,)
    full = cluster("doctor", "--full")
    assert full.exit_code == ExitCode.OK, full.stdout


def test_support_commands_find_and_explain(cluster: CLI) -> None:
    s = open_session(cluster, deposit=500)
    assert request(cluster, s, "where is my zanzibarite refund")["exit"] == ExitCode.OK
    found = cluster("session", "find", "zanzibarite", "--json")
    assert found.exit_code == ExitCode.OK, found.stderr
    assert s.id in found.stdout
    charged = cluster("session", "requests", s.id, "--json")
    assert charged.exit_code == ExitCode.OK, charged.stderr
    doc = json.loads(charged.stdout)
    debits = sum(r["debitedSats"] for r in doc["requests"])
    assert (
        debits > 0
        and 500 - debits
        == json.loads(cluster("session", "show", s.id, "--json").stdout)["balanceSats"]
    )
    listed = cluster("session", "list", "--json", "--limit", "500")
    assert listed.exit_code == ExitCode.OK and s.id in listed.stdout
    short = cluster("session", "show", s.id[:8], "--json")
    assert short.exit_code == ExitCode.OK and json.loads(short.stdout)["sessionId"] == s.id


def test_busy_and_expired_sessions_are_refused(cluster: CLI) -> None:
    s = open_session(cluster, deposit=500)
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(
            "UPDATE sessions SET lease_owner = %s,"
            " lease_until = now() + interval '1 minute' WHERE id = %s",
            (uuid.uuid4(), s.id),
        )
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("TOWER_BUSY_WAIT", "0")
            busy = cluster("session", "request", s.id, "hi", "--macaroon", s.macaroon, "--json")
        conn.execute(
            "UPDATE sessions SET lease_owner = NULL, lease_until = NULL,"
            " created_at = now() - interval '3 days', last_activity_at = now() - interval '2 days',"
            " expires_at = now() - interval '1 day' WHERE id = %s",
            (s.id,),
        )
    assert busy.exit_code == ExitCode.NOT_SERVED and "busy" in busy.stdout
    expired = request(cluster, s, "hi")
    assert expired["exit"] == ExitCode.NOT_SERVED and "expired" in str(expired["reason"])
    shown = json.loads(cluster("session", "show", s.id, "--json").stdout)
    assert shown["balanceSats"] == 500 and shown["state"] == "expired"


# Last: the files it adds are not in the packaged folder, which doctor compares with.
def test_a_migration_adding_a_per_session_table_distributes_it(
    cluster: CLI, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    shutil.copytree(default_dir(), folder)
    (folder / "0900_session_notes.sql").write_text(
        "CREATE TABLE session_notes (session_id uuid NOT NULL REFERENCES sessions (id),"
        " id bigint GENERATED ALWAYS AS IDENTITY, note text NOT NULL,"
        " PRIMARY KEY (session_id, id));\n"
        "CREATE INDEX session_notes_note ON session_notes (session_id, note);\n"
    )
    (folder / "0901_session_notes_flag.sql").write_text(
        "ALTER TABLE session_notes ADD COLUMN flagged boolean;\n"
        "ALTER TABLE session_messages ADD COLUMN IF NOT EXISTS flagged boolean;\n"
        # a function after DDL on distributed tables, in one transaction: Citus refuses
        # it after a parallel statement, so the file must run in sequential mode
        "CREATE FUNCTION towerctl_note_count(p_sid uuid) RETURNS bigint LANGUAGE sql"
        " AS $$ SELECT count(*) FROM session_notes WHERE session_id = p_sid $$;\n"
    )
    result = cluster("migrate", "--dir", str(folder))
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "distribute session_notes: by session_id, colocated with sessions" in result.stderr
    with psycopg.connect(URL) as conn:
        row = conn.execute(
            "SELECT partmethod FROM pg_dist_partition"
            " WHERE logicalrelid = 'session_notes'::regclass"
        ).fetchone()
    assert row == ("h",)
    assert {s["state"] for s in steps(cluster)} == {"in place"}
