"""Crash safety: towerctl killed (SIGKILL) or cut off from its server at random moments.

- `session request --batch` SIGKILLed at random moments (during start-up, while
  the agent runs with no transaction open, while the outcome is written):
  after every kill `doctor` passes, no request lacks its messages, the balance
  is the deposit minus the debits, every printed outcome is in the store and
  at most one outcome is in the store without having been printed; a retry with
  the same idempotency key never charges twice.
- The database server stopped (fast shutdown) in the middle of a batch:
  towerctl exits 8 with one line on stderr; after a restart `doctor` passes.
- `migrate` SIGKILLed at random moments: each file and its ledger row are
  all-or-nothing after every kill, and the next `migrate` finishes cleanly.

The long variants (`@pytest.mark.slow`) run with `pytest --slow`. Each test
prints its figures (run with `-s` to see them) and records them as properties.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import faults
from conftest import CLI, ROOT_KEY_HEX, OpenedSession, open_session

RecordProperty = Callable[[str, object], None]

DEPOSIT = 100_000_000  # large enough that no batch here can pause the session
ECHO_LINES = 400  # more than any kill point below waits for
EXEC_LINES = 60
AGENT_SLEEP = 0.05
# Where a batch is killed, in turn: each is an observed event, not a delay.
BATCH_KILL_POINTS = ("agent started, nothing recorded", "outcomes printed", "agent started again")


def report(record_property: RecordProperty, name: str, work: Callable[[], dict[str, Any]]) -> None:
    """Run `work`, add the seconds it took to its figures, print and record them."""
    began = time.monotonic()
    figures = work()
    figures["seconds"] = round(time.monotonic() - began, 1)
    print(f"\n[{name}] " + json.dumps(figures, sort_keys=True))
    for key, value in figures.items():
        record_property(key, value)


def ndjson(prefix: str, count: int) -> str:
    return "".join(
        json.dumps({"message": f"{prefix} message {i}", "idempotencyKey": f"{prefix}-{i}"}) + "\n"
        for i in range(count)
    )


def doctor_ok(cli: CLI) -> None:
    done = cli("doctor", "--json")
    doc = json.loads(done.stdout)
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert done.exit_code == 0 and doc["ok"] and not failed, failed or done.stderr


def assert_money_and_messages(figures: faults.StoreFigures) -> None:
    assert figures.requests_without_user_message == 0, figures
    assert figures.complete_without_assistant_message == 0, figures
    assert figures.debits_ledger == figures.debits_requests, figures
    assert figures.balance == figures.deposits - figures.debits_ledger, figures
    assert figures.balance >= 0


# --- 1. session request --batch, SIGKILLed -----------------------------------


def kill_batches(
    cli: CLI,
    db_url: str,
    tower_env: dict[str, str],
    tmp_path: Path,
    *,
    kills: int,
    seed: int,
) -> dict[str, Any]:
    """SIGKILL `session request --batch` `kills` times; check the store after each kill."""
    rng = random.Random(seed)
    s: OpenedSession = open_session(cli, DEPOSIT)
    # A killed request's session lease runs out after the agent deadline + 5 s (echo: 5 s):
    # a short deadline keeps that below the busy wait, so the next batch waits, not fails.
    base_env = faults.process_env(
        {**tower_env, "TOWER_BUSY_WAIT": "10", "TOWER_AGENT_TIMEOUT": "2"}
    )
    outcomes: Counter[str] = Counter()
    delays: list[float] = []
    lines_at_kill: list[int] = []
    agent = faults.sleepy_agent(tmp_path, AGENT_SLEEP)
    round_no = 0
    done_kills = 0
    while done_kills < kills:
        assert round_no < 2 * kills + 10, "too many batches finished before their kill"
        use_exec = round_no % 2 == 1
        prefix = f"r{round_no}"
        args = ["session", "request", s.id, "--batch", "--macaroon", s.macaroon]
        env = dict(base_env)
        agent_log = tmp_path / f"agent-{round_no}.log"
        if use_exec:
            args += ["--agent", agent]
            env["CRASH_AGENT_LOG"] = str(agent_log)
        total = EXEC_LINES if use_exec else ECHO_LINES
        before = faults.store_figures(db_url, s.id)
        point = BATCH_KILL_POINTS[(round_no // 2) % len(BATCH_KILL_POINTS)] if use_exec else (
            "outcomes printed")  # fmt: skip
        lines = rng.randint(1, 40 if not use_exec else 5)
        proc = faults.start(args, env, tmp_path / "runs", ndjson(prefix, total))
        if point == "agent started, nothing recorded":
            faults.wait_until(proc, lambda log=agent_log: faults.agent_starts(log) >= 1, "start")
        else:
            faults.wait_until(
                proc, lambda p=proc, n=lines: len(p.complete_lines()) >= n, f"{lines} lines"
            )
            if point == "agent started again":
                started = faults.agent_starts(agent_log)
                faults.wait_until(
                    proc,
                    lambda log=agent_log, n=started: faults.agent_starts(log) > n,
                    "next agent start",
                )
        delay = time.time() - proc.started
        killed = proc.kill()
        round_no += 1

        printed = [json.loads(line) for line in proc.complete_lines()]
        assert "Traceback" not in proc.stderr, proc.stderr
        # Every printed outcome is a served request: none was refused as busy: the
        # lease of an earlier killed process ran out within the busy wait.
        assert all(o["state"] == "complete" and o["requestId"] for o in printed), printed[:3]
        after = faults.store_figures(db_url, s.id)
        assert_money_and_messages(after)
        mine = {k: v for k, v in after.keys.items() if k.startswith(prefix + "-")}
        # The store holds a prefix of the batch's lines: the printed ones, plus at most
        # the request in flight (committed by the server after the client died, or
        # before its outcome line was written).
        assert set(mine) == {f"{prefix}-{i}" for i in range(len(mine))}
        assert 0 <= len(mine) - len(printed) <= 1, (len(mine), len(printed))
        for i, o in enumerate(printed):
            assert mine[f"{prefix}-{i}"] == (o["requestId"], o["debitedSats"])
        assert after.requests == before.requests + len(mine)
        assert after.debits_ledger - before.debits_ledger == sum(d for _, d in mine.values())

        if not killed:
            assert proc.proc.returncode == 0, proc.stderr
            assert len(printed) == total
            outcomes["finished before the kill"] += 1
            continue
        done_kills += 1
        delays.append(round(delay, 3))
        lines_at_kill.append(len(printed))
        if not mine:
            outcomes["killed before any request was recorded"] += 1
        else:
            outcomes["killed after some requests were recorded"] += 1
        if len(mine) > len(printed):
            outcomes["killed between commit and output (recorded, not printed)"] += 1
        if use_exec:
            outcomes["exec rounds"] += 1
            assert proc.killed_at is not None
            if faults.agent_running_at(agent_log, proc.killed_at):
                outcomes["killed while the agent ran (no transaction open)"] += 1

        doctor_ok(cli)

        # Retry the first line without a printed outcome with its idempotency key:
        # it is served once, whether or not the killed process had recorded it.
        i = len(printed)
        key, message = f"{prefix}-{i}", f"{prefix} message {i}"
        retry = cli(
            "session",
            "request",
            s.id,
            message,
            "--idempotency-key",
            key,
            "--json",
            "--macaroon",
            s.macaroon,
        )
        assert retry.exit_code == 0, retry.stderr
        doc = json.loads(retry.stdout)
        final = faults.store_figures(db_url, s.id)
        assert_money_and_messages(final)
        assert final.keys[key] == (doc["requestId"], doc["debitedSats"])
        if key in mine:
            outcomes["retry replayed the unprinted outcome"] += 1
            assert mine[key] == final.keys[key]
            assert final.balance == after.balance and final.requests == after.requests
        else:
            outcomes["retry served a new request"] += 1
            assert final.requests == after.requests + 1
            assert final.balance == after.balance - doc["debitedSats"]

    doctor_ok(cli)
    last = faults.store_figures(db_url, s.id)
    assert_money_and_messages(last)
    # Kills landed at different points: some before the first outcome, some mid-batch.
    assert outcomes["killed before any request was recorded"] >= 1, outcomes
    assert outcomes["killed after some requests were recorded"] >= 1, outcomes
    assert outcomes["killed while the agent ran (no transaction open)"] >= 1, outcomes
    return {
        "kills": done_kills,
        "batches": round_no,
        "seed": seed,
        "outcomes": dict(outcomes),
        "requests_recorded": last.requests,
        "debited_sats": last.debits_ledger,
        "balance": last.balance,
        "lines_printed_at_kill_min_median_max": [
            min(lines_at_kill),
            sorted(lines_at_kill)[len(lines_at_kill) // 2],
            max(lines_at_kill),
        ],
        "delay_s_min_max": [min(delays), max(delays)],
        "doctor_runs_ok": done_kills + 1,
    }


@pytest.mark.parametrize(
    ("kills", "seed", "title"),
    [
        pytest.param(26, 20261126, "sigkill batch", id="26-kills"),
        pytest.param(200, 7, "sigkill batch (slow)", id="200-kills", marks=pytest.mark.slow),
    ],
)
def test_batch_sigkilled_at_random_moments_leaves_a_consistent_store(
    cli: CLI,
    db_url: str,
    tower_env: dict[str, str],
    tmp_path: Path,
    record_property: RecordProperty,
    kills: int,
    seed: int,
    title: str,
) -> None:
    report(
        record_property,
        title,
        lambda: kill_batches(cli, db_url, tower_env, tmp_path, kills=kills, seed=seed),
    )


# --- 2. the database server stopped mid-batch ---------------------------------


def wait_for_lines(proc: faults.Towerctl, count: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = len(proc.complete_lines())
        if seen >= count:
            return seen
        if proc.proc.poll() is not None:
            raise AssertionError(f"towerctl exited {proc.proc.returncode}: {proc.stderr}")
        time.sleep(0.002)
    raise AssertionError(f"no {count} outcomes within {timeout}s: {proc.stderr}")


def stop_server_mid_batch(tmp_path: Path, *, cycles: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    stop_seconds: list[float] = []
    start_seconds: list[float] = []
    with faults.own_server() as server:
        env = faults.process_env(
            {
                "TOWER_DATABASE_URL": server.url,
                "TOWER_HOME": str(tmp_path / "home"),
                "TOWER_ROOT_KEY": ROOT_KEY_HEX,
                "TOWER_BUSY_WAIT": "10",
                "TOWER_AGENT_TIMEOUT": "2",  # the lease left by a stopped batch: 2 s + 5 s
                "NO_COLOR": "1",
            }
        )
        migrated = faults.run(["migrate"], env)
        assert migrated.returncode == 0, migrated.stderr
        opened = faults.run(["session", "open", "--deposit", str(DEPOSIT), "--json"], env)
        assert opened.returncode == 0, opened.stderr
        doc = json.loads(opened.stdout)
        sid, token = doc["sessionId"], doc["macaroon"]
        agent = faults.sleepy_agent(tmp_path, 0.05)
        for cycle in range(cycles):
            use_exec = cycle % 2 == 0
            prefix = f"c{cycle}"
            args = ["session", "request", sid, "--batch", "--macaroon", token]
            run_env = dict(env)
            agent_log = tmp_path / f"agent-{cycle}.log"
            if use_exec:
                args += ["--agent", agent]
                run_env["CRASH_AGENT_LOG"] = str(agent_log)
            total = 400 if use_exec else 5000
            proc = faults.start(args, run_env, tmp_path / "runs", ndjson(prefix, total))
            wait_for_lines(proc, rng.randint(2, 6) if use_exec else rng.randint(5, 300))
            time.sleep(rng.uniform(0, 0.06))
            stopped_at = time.time()
            stop_seconds.append(round(server.stop("fast"), 3))
            code = proc.wait(timeout=60)
            err = proc.stderr
            assert code == 8, (code, err)
            assert "Traceback" not in err
            assert err.startswith("towerctl: ") and err.count("\n") == 1, err
            assert "database" in err, err
            printed = [json.loads(line) for line in proc.complete_lines()]
            assert len(printed) < total
            if use_exec:
                running = faults.agent_running_at(agent_log, stopped_at)
                where = "an agent ran" if running else "no agent was running"
                outcomes[f"stopped while {where}"] += 1
            else:
                outcomes["stopped during echo requests"] += 1
            outcomes[err.strip()] += 1

            start_seconds.append(round(server.start(), 3))
            doctor = faults.run(["doctor", "--json"], env)
            report_doc = json.loads(doctor.stdout)
            assert doctor.returncode == 0 and report_doc["ok"], doctor.stdout + doctor.stderr
            figures = faults.store_figures(server.url, sid)
            assert_money_and_messages(figures)
            mine = {k: v for k, v in figures.keys.items() if k.startswith(prefix + "-")}
            assert set(mine) == {f"{prefix}-{i}" for i in range(len(mine))}
            # Every commit waited for the disk: at most the request in flight was
            # recorded without its outcome printed.
            assert len(mine) - len(printed) in (0, 1), (len(mine), len(printed), err)
            if len(mine) > len(printed):
                outcomes["recorded but not printed when the server stopped"] += 1
            for i, o in enumerate(printed):
                assert mine[f"{prefix}-{i}"] == (o["requestId"], o["debitedSats"])
            # The session serves again after the restart (no lock or state left behind).
            again = faults.run(
                ["session", "request", sid, "--batch", "--macaroon", token],
                env,
                ndjson(f"after-{prefix}", 2),
            )
            assert again.returncode == 0, again.stderr
        last = faults.store_figures(server.url, sid)
        assert_money_and_messages(last)
    return {
        "cycles": cycles,
        "seed": seed,
        "outcomes": dict(outcomes),
        "requests_recorded": last.requests,
        "debited_sats": last.debits_ledger,
        "balance": last.balance,
        "stop_s": stop_seconds,
        "restart_s": start_seconds,
    }


@pytest.mark.parametrize(
    ("cycles", "seed", "title"),
    [
        pytest.param(4, 11, "server stop", id="4-cycles"),
        pytest.param(20, 12, "server stop (slow)", id="20-cycles", marks=pytest.mark.slow),
    ],
)
def test_server_stopped_mid_batch_exits_8_and_doctor_passes_after_restart(
    tmp_path: Path, record_property: RecordProperty, cycles: int, seed: int, title: str
) -> None:
    report(
        record_property, title, lambda: stop_server_mid_batch(tmp_path, cycles=cycles, seed=seed)
    )


# --- 3. migrate, SIGKILLed ---------------------------------------------------


def write_migrations(folder: Path, tables: int, index_version: int) -> list[int]:
    """`tables` files that each sleep then create a table, plus one no-transaction index file."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = list(range(1, tables + 2))
    table_no = 0
    for v in versions:
        if v == index_version:
            body = (
                "-- towerctl:no-transaction\n"
                "SELECT pg_sleep(0.02);\n"
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS t1_note_idx ON t1 (note);\n"
            )
            (folder / f"{v:04d}_t1_note_idx.sql").write_text(body)
            continue
        table_no += 1
        body = (
            "SELECT pg_sleep(0.02);\n"
            f"CREATE TABLE t{table_no} (id bigint PRIMARY KEY, note text);\n"
            f"INSERT INTO t{table_no} SELECT g, 'note ' || g FROM generate_series(1, 200) g;\n"
        )
        (folder / f"{v:04d}_t{table_no}.sql").write_text(body)
    return versions


def migration_state(url: str) -> tuple[list[int], set[str], bool | None]:
    """(ledger versions in order, tables t*, whether the index is valid / None if absent),
    from one snapshot: a killed runner's last file may still commit on the server meanwhile
    (a transactional file is sent whole, in one round trip)."""
    with psycopg.connect(url, autocommit=True) as c, c.transaction():
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        exists = c.execute("SELECT to_regclass('tower_schema_migrations') IS NOT NULL").fetchone()
        ledger = (
            [r[0] for r in c.execute("SELECT version FROM tower_schema_migrations ORDER BY 1")]
            if exists and exists[0]
            else []
        )
        tables = {
            r[0]
            for r in c.execute(
                "SELECT tablename FROM pg_tables"
                " WHERE schemaname = current_schema() AND tablename ~ '^t[0-9]+$'"
            )
        }
        row = c.execute(
            "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE c.relname = 't1_note_idx'"
        ).fetchone()
    return ledger, tables, (row[0] if row else None)


def file_running(url: str) -> bool:
    """Whether a migration file's statement is running on the server right now."""
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND query LIKE 'SELECT pg_sleep%' AND state = 'active'"
        ).fetchone()
    return bool(row and row[0])


def expected_tables(ledger: list[int], index_version: int) -> set[str]:
    return {f"t{v if v < index_version else v - 1}" for v in ledger if v != index_version}


def kill_migrations(
    url: str, tmp_path: Path, *, tables: int, kills: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    index_version = tables // 2 + 1
    folder = tmp_path / "migrations"
    versions = write_migrations(folder, tables, index_version)
    env = faults.process_env({"TOWER_DATABASE_URL": url, "TOWER_HOME": str(tmp_path / "home")})
    args = ["migrate", "--dir", str(folder), "--lock-timeout", "30"]
    # The killed runs stop short of the last file, so the final run always has work left
    # whatever the machine's speed (a fast runner could otherwise finish between kills).
    killed_args = [*args, "--to", str(versions[-2])]
    outcomes: Counter[str] = Counter()
    progress: list[int] = []
    for round_no in range(kills):
        before, _, _ = migration_state(url)
        if len(before) == len(versions) - 1:
            break  # the killed runs' share is done (a run finished before its kill)
        proc = faults.start(killed_args, env, tmp_path / "runs")
        if round_no % 2 == 0:
            # A file is running (its pg_sleep is seen on the server) and none has committed.
            faults.wait_until(
                proc,
                lambda n=len(before): file_running(url) and len(migration_state(url)[0]) == n,
                "a file running",
                poll=0.001,
            )
        else:
            # Some files committed (rows seen in the ledger), more to come.
            target = len(before) + rng.randint(1, 6)
            faults.wait_until(
                proc, lambda n=target: len(migration_state(url)[0]) >= n, "ledger rows"
            )
        killed = proc.kill()
        ledger, present, index_valid = migration_state(url)
        assert len(ledger) == len(set(ledger))
        # A transactional file and its ledger row are all or nothing after a kill.
        assert present == expected_tables(ledger, index_version), (ledger, sorted(present))
        if index_version in ledger:
            assert index_valid is True
        if index_valid is True and index_version not in ledger:
            outcomes["index built, not yet recorded (the next run skips it: IF NOT EXISTS)"] += 1
        if index_valid is False:
            outcomes["index build still running server-side after the kill"] += 1
        progress.append(len(ledger))
        if not killed:
            assert proc.proc.returncode == 0, proc.stderr
            outcomes["finished before the kill"] += 1
        elif len(ledger) == len(before):
            outcomes["killed before its first file committed"] += 1
        elif len(ledger) == len(versions) - 1:
            outcomes["killed after its last file, before exiting"] += 1
        else:
            outcomes["killed mid-run"] += 1
    # The final run below applies what the killed runs left: at least the last file.
    assert progress[-1] < len(versions), progress
    began = time.monotonic()
    final = faults.run(args, env, timeout=90)
    final_seconds = time.monotonic() - began
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    status = faults.run(["migrate", "status", "--dir", str(folder), "--check", "--json"], env)
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["upToDate"] is True
    ledger, present, index_valid = migration_state(url)
    assert ledger == versions  # each version exactly once
    assert present == {f"t{n}" for n in range(1, tables + 1)}
    assert index_valid is True
    with psycopg.connect(url, autocommit=True) as c:
        counts = c.execute(f"SELECT count(*) FROM t1, t{tables}").fetchone()
    assert counts == (200 * 200,)
    assert outcomes["killed mid-run"] >= 1, outcomes
    return {
        "files": len(versions),
        "kills": sum(n for k, n in outcomes.items() if k.startswith("killed")),
        "seed": seed,
        "outcomes": dict(outcomes),
        "ledger_rows_after_each_kill": progress,
        "final_migrate_applied": len(versions) - progress[-1],
        "final_migrate_s": round(final_seconds, 2),
    }


@pytest.mark.parametrize(
    ("tables", "kills", "seed", "title"),
    [
        pytest.param(80, 6, 3, "sigkill migrate", id="6-kills"),
        pytest.param(500, 40, 4, "sigkill migrate (slow)", id="40-kills", marks=pytest.mark.slow),
    ],
)
def test_migrate_sigkilled_at_random_moments_then_finishes_cleanly(
    empty_db_url: str,
    tmp_path: Path,
    record_property: RecordProperty,
    tables: int,
    kills: int,
    seed: int,
    title: str,
) -> None:
    report(
        record_property,
        title,
        lambda: kill_migrations(empty_db_url, tmp_path, tables=tables, kills=kills, seed=seed),
    )
