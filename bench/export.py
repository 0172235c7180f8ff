"""Workload f: transcript export against psql `\\copy`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from uuid import UUID

from common import (
    Sample,
    ToolFailed,
    Workload,
    alternate,
    digest,
    log,
    run_quiet,
    run_timed,
)
from harness import BenchBase, Opened
from tools import (
    Server,
)
from towerctl.transcripts import MESSAGE_JSON, Format, Selection, copy_query


class ExportWorkloads(BenchBase):
    # f: transcript export ---------------------------------------------------------------------

    def messages_available(self) -> bool:
        try:
            run_quiet(self.towerctl("session", "messages", "--help"), self.base_env())
        except ToolFailed:
            return False
        return True

    def export_db(self, count: int) -> tuple[str, Opened]:
        """A database holding one session of `count` messages (seeded once per size)."""
        if count not in self.export_dbs:
            db = self.server.create(self.schema_template())
            opened = self.open_session(db)
            started = time.perf_counter()
            seed_messages(self.server, db, opened.session_id, count)
            log(f"seeded {count:,} messages in {time.perf_counter() - started:.1f}s")
            self.export_dbs[count] = opened
            self.export_db_names[count] = db
        return self.export_db_names[count], self.export_dbs[count]

    def export_towerctl(self, db: str, opened: Opened, fmt: str, path: Path) -> Sample:
        cmd = self.towerctl("session", "messages", opened.session_id, "--format", fmt)
        cmd += ["-o", path, "--macaroon-file", opened.token_file]
        return run_timed(cmd, self.tower_env(db))

    def export_psql(self, db: str, opened: Opened, fmt: str, path: Path) -> Sample:
        script = self.work / f"export-{fmt}.psql"
        script.write_text(psql_export_script(opened.session_id, fmt, path))
        cmd: list[str | Path] = [self.tools.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", script]
        return run_timed(cmd, self.pg_env(db))

    def export_contenders(
        self, count: int, fmt: str, with_towerctl: bool
    ) -> list[tuple[str, Callable[[], Sample]]]:
        db, opened = self.export_db(count)
        sizes: dict[str, int] = {}

        def checked(tool: str, path: Path, sample: Sample) -> Sample:
            size = path.stat().st_size
            path.unlink()
            if sizes.setdefault(tool, size) != size:
                raise ToolFailed(f"{tool} wrote {size} bytes, earlier {sizes[tool]}")
            return sample

        def towerctl() -> Sample:
            path = self.work / f"export-towerctl.{fmt}"
            return checked("towerctl", path, self.export_towerctl(db, opened, fmt, path))

        def psql() -> Sample:
            path = self.work / f"export-psql.{fmt}"
            return checked("psql", path, self.export_psql(db, opened, fmt, path))

        contenders: list[tuple[str, Callable[[], Sample]]] = []
        if with_towerctl:
            contenders.append(("towerctl", towerctl))
        contenders.append(("psql \\copy", psql))
        return contenders

    def export_equivalence(self, count: int) -> list[str]:
        """Run both exporters once per format and compare what they wrote."""
        db, opened = self.export_db(count)
        notes: list[str] = []
        for fmt in ("ndjson", "csv", "json"):
            mine, theirs = self.work / f"same-towerctl.{fmt}", self.work / f"same-psql.{fmt}"
            self.export_towerctl(db, opened, fmt, mine)
            self.export_psql(db, opened, fmt, theirs)
            if fmt == "json":
                a, b = json.loads(mine.read_bytes()), json.loads(theirs.read_bytes())
                same = a == b and len(a["messages"]) == count
            else:
                same = digest(mine) == digest(theirs)
            if fmt == "ndjson" and mine.read_bytes().count(b"\n") != count:
                raise ToolFailed(f"towerctl's NDJSON does not have {count} lines")
            notes.append(
                f"{fmt}: towerctl and psql output "
                + ("identical" if same else "DIFFER")
                + (" (as parsed JSON)" if fmt == "json" else " (byte for byte)")
                + f" at {count:,} messages"
            )
            if not same:
                raise ToolFailed(f"the {fmt} exports of towerctl and psql differ at {count:,}")
            mine.unlink()
            theirs.unlink()
        return notes

    def export(self, count: int, reps: int, formats: Sequence[str], key_prefix: str) -> None:
        available = self.messages_available()
        for fmt in formats:
            title = f"export {count:,} messages as {fmt.upper()}"

            def run(w: Workload, fmt: str = fmt) -> None:
                if not available:
                    w.notes.append("towerctl session messages: not available (command missing)")
                w.series.extend(alternate(self.export_contenders(count, fmt, available), reps))

            self.add(Workload(f"{key_prefix}.{fmt}", title, count, "messages"), run)


SEED_REQUESTS = """
INSERT INTO session_requests (session_id, id, state, agent, input_tokens, output_tokens,
    cost_sats, debited_sats, balance_after_sats, created_at, completed_at)
OVERRIDING SYSTEM VALUE
SELECT %(sid)s, g, 'complete', 'echo', 30, 30, 19, 0, 0,
       %(t0)s::timestamptz + g * interval '2 ms', %(t0)s::timestamptz + g * interval '2 ms'
FROM generate_series(1, %(requests)s) AS g"""

# Message m belongs to request (m + 1) / 2; odd ids are the user's, even the assistant's.
# Some contents carry quotes, a comma, a backslash, a newline and non-ASCII text.
SEED_MESSAGES = r"""
INSERT INTO session_messages (session_id, id, role, content, session_request_id,
    token_count, created_at)
OVERRIDING SYSTEM VALUE
SELECT %(sid)s, m, CASE WHEN m %% 2 = 1 THEN 'user' ELSE 'assistant' END, c.content,
       (m + 1) / 2, ceil(length(c.content) / 4.0)::int,
       %(t0)s::timestamptz + m * interval '1 ms'
FROM generate_series(1, %(messages)s) AS m
CROSS JOIN LATERAL (SELECT CASE
    WHEN m %% 7 = 0 THEN 'Question ' || m || E': "quoted", a comma, a back\\slash\nand a 2nd line'
    WHEN m %% 11 = 0 THEN 'Réponse ' || m || ' — naïve café ✓ 日本語'
    ELSE 'Message ' || m || ' ' || repeat('lorem ipsum ', 1 + (m %% 9)::int)
END AS content) AS c"""


def seed_messages(server: Server, db: str, session_id: str, count: int) -> None:
    """`count` messages (count/2 requests) in one session, fast: set-based, FK triggers off."""
    import psycopg

    params = {"sid": session_id, "t0": "2026-11-01T00:00:00Z"}
    with psycopg.connect(server.url(db), autocommit=True) as conn:
        with conn.transaction():
            # The rows are built valid; replica mode only skips the per-row FK checks.
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(SEED_REQUESTS, params | {"requests": (count + 1) // 2})
            conn.execute(SEED_MESSAGES, params | {"messages": count})
        for table in ("session_requests", "session_messages"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"
            )
        conn.execute("VACUUM (FREEZE, ANALYZE) session_requests, session_messages")
        broken = conn.execute(
            "SELECT count(*) FROM session_messages m LEFT JOIN session_requests r"
            " ON r.session_id = m.session_id AND r.id = m.session_request_id WHERE r.id IS NULL"
        ).fetchone()
        if broken and broken[0]:
            raise ToolFailed(f"seeding left {broken[0]} messages without their request")


def project_copy(session_id: str, fmt: str) -> tuple[str, str]:
    """towerctl's own `COPY (SELECT ...)` for this session and format, on one line (as psql's
    `\\copy` needs it), split into the query and its options."""
    query = copy_query(Selection(UUID(session_id)), Format(fmt)).as_string()
    query, _, options = " ".join(query.split()).rpartition(" TO STDOUT WITH (")
    return query.removeprefix("COPY "), options.removesuffix(")")


def psql_export_script(session_id: str, fmt: str, path: Path) -> str:
    """A psql script exporting one session's messages with `\\copy` and towerctl's own
    queries (towerctl.transcripts), as towerctl's formats."""
    target = f"'{path}'"
    if fmt in ("ndjson", "csv"):
        query, options = project_copy(session_id, fmt)
        return f"\\copy {query} TO {target} WITH ({options})\n"
    where = f"FROM session_messages WHERE session_id = '{session_id}'::uuid"
    first = f"(SELECT min(id) {where})"
    element = f"CASE WHEN id = {first} THEN '' ELSE ',' END || {MESSAGE_JSON}"
    _, verbatim = project_copy(session_id, "ndjson")
    return (
        f"\\o {target}\n"
        f"""\\qecho -n '{{"sessionId": "{session_id}", "messages": ['\n"""
        f"\\copy (SELECT {element} {where} ORDER BY id) TO STDOUT WITH ({verbatim})\n"
        """\\qecho '], "nextCursor": null}'\n"""
    )
