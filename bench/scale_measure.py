"""Measuring the big and the small store side by side (bench/scale.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from common import Sample, Series, Workload, log, run_quiet, run_timed
from scale_store import COMMON, RARE

# 1,000 new requests, written as a request writes them: the request, its debit, its two
# messages, the session's balance. On the sessions opened last, ten each.
NEW_REQUESTS = """
WITH s AS (
    SELECT id FROM sessions ORDER BY created_at DESC, id DESC LIMIT %(n)s / 10
), r AS (
    INSERT INTO session_requests (session_id, state, agent, input_tokens, output_tokens,
                                  cost_sats, debited_sats, balance_after_sats, completed_at)
    SELECT s.id, 'complete', 'echo', 10, 10, 1, 1, 0, now()
    FROM s CROSS JOIN generate_series(1, 10)
    RETURNING session_id, id
), l AS (
    INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)
    SELECT session_id, 'debit', 1, id FROM r
), m AS (
    INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
    SELECT r.session_id, x.role, 'more about the plan', r.id, 3
    FROM r CROSS JOIN (VALUES ('user'), ('assistant')) AS x(role)
)
UPDATE sessions SET balance_sats = balance_sats - 10, last_activity_at = now()
WHERE id IN (SELECT id FROM s)
"""

SMALL = "≤ 1.3× small"
COMMANDS: list[tuple[str, tuple[str, ...], str, str]] = [
    ("find.rare", ("session", "find", RARE), " (in 10 sessions)", "≤ 0.3 s"),
    ("find.common", ("session", "find", COMMON), " (1 message in 200): first page", "≤ 0.3 s"),
    ("requests", ("session", "requests", "{id}"), "", "≤ 1.2× small"),
    ("report", ("report", "--since", "1d", "--by", "hour"), "", "≤ 1 s"),
    ("list", ("session", "list"), "", SMALL),
    ("list.limit", ("session", "list", "--limit", "20"), "", SMALL),
    ("list.activity", ("session", "list", "--sort", "activity"), "", SMALL),
    ("list.since", ("session", "list", "--since", "1d"), "", SMALL),
    ("list.state", ("session", "list", "--state", "paused"), "", SMALL),
    ("show", ("session", "show", "{id}"), "", SMALL),
    ("messages", ("session", "messages", "{id}", "--limit", "100"), "", SMALL),
]

FLOOR = [
    f"SELECT count(*) FROM {t}"
    for t in ("sessions", "session_requests", "session_messages", "balance_ledger")
]


@dataclass
class Row:
    key: str
    title: str
    big: Series = field(default_factory=lambda: Series("big"))
    small: Series = field(default_factory=lambda: Series("small"))
    limit: str = ""  # the target, in words
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if not self.big.samples or not self.small.samples:
            return None
        return self.big.median / self.small.median


def _env(server: Any, db: str, home: Path) -> dict[str, str]:
    from scale import tower_env

    return tower_env(server, db, home)


def _pick(server: Any, db: str) -> str:
    """A session in the middle of the store (by age), with its ten requests."""
    rows = server.query(
        db,
        "SELECT id::text FROM sessions ORDER BY created_at OFFSET"
        " (SELECT count(*) / 2 FROM sessions) LIMIT 1",
    )
    return str(rows[0][0])


def _run(server: Any, db: str, sql: str, params: Any = None) -> None:
    import psycopg

    with psycopg.connect(server.url(db), autocommit=True) as conn:
        conn.execute(sql, params)


def _floor(server: Any, db: str) -> Sample:
    import psycopg

    with psycopg.connect(server.url(db), autocommit=True) as conn:
        started = time.perf_counter()
        for sql in FLOOR:
            conn.execute(sql).fetchone()
        elapsed = time.perf_counter() - started
    return Sample(elapsed, 0.0, 0)


def measure(server: Any, towerctl: Path, home: Path, runs: int) -> list[Row]:
    from scale import STORES

    envs = {key: _env(server, db, home) for key, (db, _) in STORES.items()}
    for key, (db, _) in STORES.items():
        run_quiet([towerctl, "migrate"], envs[key])
        _run(server, db, "VACUUM ANALYZE")
    picked = {key: _pick(server, db) for key, (db, _) in STORES.items()}
    tokens = {
        key: run_quiet(
            [towerctl, "macaroon", "mint", picked[key], "--scope", "read"], envs[key]
        ).strip()
        for key in STORES
    }

    def per_store(args: tuple[str, ...]) -> Callable[[str], list[Any]]:
        return lambda key: [towerctl, *(a.format(id=picked[key]) for a in args)]

    commands = [
        (key, " ".join(args).replace("{id}", "ID") + note, per_store(args), limit)
        for key, args, note, limit in COMMANDS
    ]
    rows: list[Row] = []
    for key, title, argv, limit in commands:
        row = Row(key, title, limit=limit)
        for store in ("big", "small"):  # warm-up
            run_timed(argv(store), envs[store] | {"TOWER_MACAROON": tokens[store]})
        for _ in range(runs):
            for store in ("big", "small"):
                env = envs[store] | {"TOWER_MACAROON": tokens[store]}
                getattr(row, store).samples.append(run_timed(argv(store), env))
        log(f"{title}: {row.big.median * 1000:.0f} ms / {row.small.median * 1000:.0f} ms")
        rows.append(row)
    rows.append(_doctor_incremental(server, towerctl, envs, runs))
    rows.extend(_doctor_full(server, towerctl, envs, max(runs // 2, 2)))
    _judge(rows)
    return rows


def _doctor_incremental(server: Any, towerctl: Path, envs: dict, runs: int) -> Row:
    from scale import STORES

    row = Row("doctor", "doctor after a clean run and 1,000 new requests", limit="≤ 1 s")
    for _ in range(runs):
        for store, (db, _) in STORES.items():
            run_quiet([towerctl, "doctor"], envs[store])  # the clean run
            _run(server, db, NEW_REQUESTS, {"n": 1000})
            getattr(row, store).samples.append(run_timed([towerctl, "doctor"], envs[store]))
    log(f"{row.title}: {row.big.median * 1000:.0f} ms / {row.small.median * 1000:.0f} ms")
    return row


def _doctor_full(server: Any, towerctl: Path, envs: dict, runs: int) -> list[Row]:
    from scale import STORES

    full = Row("doctor.full", "doctor --full", limit="≤ 3× floor")
    floor = Row("floor", "count(*) of the four tables (the floor)")
    for _ in range(runs):
        for store, (db, _) in STORES.items():
            getattr(floor, store).samples.append(_floor(server, db))
            sample = run_timed([towerctl, "doctor", "--full"], envs[store])
            getattr(full, store).samples.append(sample)
    log(f"doctor --full: {full.big.median:.2f} s; floor {floor.big.median:.2f} s")
    return [full, floor]


def _judge(rows: list[Row]) -> None:
    by_key = {r.key: r for r in rows}
    for row in rows:
        if row.limit.endswith("small") and row.ratio is not None:
            row.met = row.ratio <= float(row.limit.split()[1].rstrip("×"))
        elif row.limit.endswith(" s"):
            row.met = row.big.median <= float(row.limit.split()[1])
        elif row.key == "doctor.full":
            row.met = row.big.median <= 3 * by_key["floor"].big.median


def report_markdown(rows: list[Row], out: TextIO) -> None:
    floor = next(r for r in rows if r.key == "floor")
    out.write("| command | 1M sessions | 10k sessions | ratio | target | met |\n")
    out.write("|---|---:|---:|---:|---|---|\n")
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}×"
        if r.key == "doctor.full":
            ratio = f"{r.big.median / floor.big.median:.1f}× floor"
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        out.write(
            f"| `{r.title}` | {r.big.median * 1000:,.0f} ms | {r.small.median * 1000:,.0f} ms"
            f" | {ratio} | {r.limit} | {met} |\n"
        )


def to_workloads(rows: list[Row]) -> list[Workload]:
    """For bench/run.py's report: one workload a command, big and small as two series."""
    return [
        Workload(f"s.{r.key}", r.title, 1, "command", series=[r.big, r.small], notes=[r.limit])
        for r in rows
    ]
