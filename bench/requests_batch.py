"""Workload e: `session request --batch` against pgbench doing the same writes."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from common import (
    Sample,
    ToolFailed,
    Workload,
    alternate,
    run_timed,
)
from harness import BenchBase
from towerctl.config import Pricing
from towerctl.requests import rules as request_rules


class RequestWorkloads(BenchBase):
    # e: batch requests against pgbench ------------------------------------------------------------

    def batch(self, requests: int, reps: int, key: str) -> Workload:
        template = self.schema_template()
        messages = [batch_message(i) for i in range(1, requests + 1)]
        feed = self.work / f"batch-{requests}.ndjson"
        feed.write_text("".join(json.dumps({"message": m}) + "\n" for m in messages))
        out = self.work / f"batch-{requests}.out"
        reported_tps: list[float] = []

        def towerctl() -> Sample:
            with self.server.fresh(template) as db:
                opened = self.open_session(db)
                cmd = self.towerctl("session", "request", opened.session_id, "--batch")
                cmd += ["--macaroon-file", opened.token_file]
                sample = run_timed(cmd, self.tower_env(db), stdin=feed, stdout=out)
                lines = out.read_text().splitlines()
                done = sum(1 for line in lines if json.loads(line)["state"] == "complete")
                if done != requests:
                    raise ToolFailed(f"towerctl completed {done} of {requests} requests")
            return sample

        def pgbench(mode: str = "prepared") -> Sample:
            with self.server.fresh(template) as db:
                opened = self.open_session(db)
                script = self.work / f"pgbench-{db}.sql"
                script.write_text(pgbench_script(opened.session_id, messages[0]))
                # The target's peer runs prepared statements (the faster pgbench: nothing
                # planned per transaction). towerctl prepares nothing (a pooler may sit in
                # between); its plans live in its plpgsql functions. pgbench's default
                # mode (simple) is shown beside it.
                cmd: list[str | Path] = [self.tools.pgbench, "-n", "-M", mode, "-c", "1"]
                cmd += ["-t", str(requests), "-f", script]
                sample = run_timed(cmd, self.pg_env(db), stdout=out)
                tps = re.search(r"tps = ([0-9.]+)", out.read_text())
                if tps and mode == "prepared":
                    reported_tps.append(float(tps.group(1)))
                rows = self.server.query(
                    db,
                    "SELECT (SELECT count(*) FROM session_requests),"
                    " (SELECT count(*) FROM session_messages)",
                )
                if rows[0] != (requests, 2 * requests):
                    raise ToolFailed(f"pgbench wrote {rows[0]} requests/messages")
            return sample

        def run(w: Workload) -> None:
            contenders = [
                ("towerctl", towerctl),
                ("pgbench", pgbench),
                ("pgbench -M simple", lambda: pgbench("simple")),
            ]
            w.series.extend(alternate(contenders, reps))
            for s in w.series:
                w.notes.append(f"{s.tool}: {requests / s.median:,.0f} requests/s (wall clock)")
            if reported_tps:
                w.notes.append(
                    f"pgbench's own figure (-M prepared, without connection time): "
                    f"{statistics.median(reported_tps):,.0f} tps"
                )

        title = f"session request --batch, {requests:,} echo requests, one client"
        return self.add(Workload(key, title, requests, "requests"), run)


def batch_message(i: int) -> str:
    return f"Request {i:05d}: please summarise the balance and the last requests of this session."


def pgbench_script(session_id: str, message: str) -> str:
    """The writes of one towerctl request, as one transaction of plain statements."""
    sid = f"'{session_id}'::uuid"
    tokens = request_rules.tokens(message)
    cost = request_rules.cost_sats(Pricing(), tokens, tokens)
    text = message.replace("'", "''")
    return f"""\
BEGIN;
SELECT balance_sats AS balance FROM sessions WHERE id = {sid} FOR UPDATE \\gset
INSERT INTO session_requests (session_id, state, agent, input_tokens, output_tokens,
    cost_sats, debited_sats, balance_after_sats, completed_at)
VALUES ({sid}, 'complete', 'echo', {tokens}, {tokens}, {cost}, {cost}, :balance - {cost}, now())
RETURNING id AS request_id \\gset
INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)
VALUES ({sid}, 'debit', {cost}, :request_id);
UPDATE sessions SET balance_sats = :balance - {cost}, last_activity_at = now(),
    expires_at = now() + interval '24 hours'
WHERE id = {sid};
INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
VALUES ({sid}, 'user', '{text}', :request_id, {tokens}),
       ({sid}, 'assistant', '{text}', :request_id, {tokens});
COMMIT;
"""
