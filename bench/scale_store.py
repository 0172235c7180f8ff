"""A store of a given number of sessions, built with SQL, shaped as the issue's big store.

Per session: one deposit, ten complete requests each debited from it, a user and an
assistant message per request. So 1,000,000 sessions are 10,000,000 requests,
20,000,000 messages and 11,000,000 ledger rows, the ledger balanced (`doctor` is clean).

Sessions are created evenly over the last 30 days (request n of a session n minutes
after it), so a day holds 1/30 of the store. Two words are planted: RARE in the first
user message of 10 sessions, COMMON in one message of every 200.

The database is migrated first (`towerctl migrate`); the secondary indexes are then
dropped, the rows loaded with foreign keys and triggers off (as a restore does), and the
indexes built again from their own definitions, then VACUUM ANALYZE.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

REQUESTS_PER_SESSION = 10
DEPOSIT_SATS = 10_000
RARE = "zanzibarite"  # in 10 sessions
COMMON = "refund"  # in one message of every 200
COMMON_EVERY = 200
DAYS = 30

# Indexes that back no constraint: dropped before the load, built again after it.
SECONDARY_INDEXES = """
SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
WHERE t.relname IN ('sessions', 'session_requests', 'session_messages', 'balance_ledger')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
"""

SESSIONS = """
INSERT INTO sessions (id, state, balance_sats, created_at, last_activity_at, expires_at)
SELECT md5('session' || i)::uuid,
       CASE WHEN t.last + interval '24 hours' < %(now)s THEN 'expired'
            WHEN i %% 17 = 0 THEN 'paused' ELSE 'active' END,
       %(deposit)s - %(per)s * (i %% 50 + 1),
       t.created, t.last, t.last + interval '24 hours'
FROM generate_series(1, %(n)s) AS i
CROSS JOIN LATERAL (
    SELECT %(now)s - (%(n)s - i + 1) * %(step)s::interval AS created,
           %(now)s - (%(n)s - i + 1) * %(step)s::interval + %(per)s * interval '1 minute'
             AS last) AS t
"""

# Request (i - 1) * per + k of session i, at its creation + k minutes, costs i % 50 + 1.
REQUESTS = """
INSERT INTO session_requests (session_id, id, state, agent, input_tokens, output_tokens,
                              cost_sats, debited_sats, balance_after_sats, created_at,
                              completed_at)
OVERRIDING SYSTEM VALUE
SELECT md5('session' || i)::uuid, (i - 1) * %(per)s + k, 'complete',
       CASE WHEN i %% 3 = 0 THEN 'claude' ELSE 'echo' END,
       20 + k, 40 + i %% 100, i %% 50 + 1, i %% 50 + 1, %(deposit)s - k * (i %% 50 + 1),
       t.at, t.at
FROM generate_series(1, %(n)s) AS i
CROSS JOIN generate_series(1, %(per)s) AS k
CROSS JOIN LATERAL (
    SELECT %(now)s - (%(n)s - i + 1) * %(step)s::interval + k * interval '1 minute' AS at) t
"""

LEDGER = """
INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id, created_at)
SELECT id, 'deposit', %(deposit)s, NULL, created_at FROM sessions
UNION ALL
SELECT session_id, 'debit', debited_sats, id, created_at FROM session_requests
"""

WORDS = [
    "the",
    "answer",
    "about",
    "billing",
    "was",
    "cut",
    "off",
    "please",
    "continue",
    "with",
    "the",
    "plan",
    "for",
    "tomorrow",
    "and",
    "summarise",
    "what",
    "the",
    "model",
    "said",
    "on",
    "pricing",
    "tokens",
    "sessions",
    "ledger",
    "budget",
    "stream",
    "latency",
    "network",
    "backup",
    "restore",
    "migrate",
    "index",
    "vacuum",
    "replica",
    "pooler",
    "cursor",
    "page",
]

# Message m of request r: 2r - 1 the user's, 2r the assistant's.
MESSAGES = """
INSERT INTO session_messages (session_id, id, role, content, session_request_id,
                              token_count, created_at)
OVERRIDING SYSTEM VALUE
SELECT r.session_id, 2 * r.id - 1 + x.a, x.role,
       CASE WHEN x.a = 0 AND r.id %% %(per)s = 1 AND (r.id - 1) / %(per)s %% %(rare_every)s = 0
              THEN %(rare)s || ' ' ELSE '' END
       || CASE WHEN (2 * r.id - 1 + x.a) %% %(common_every)s = 0 THEN %(common)s || ' '
               ELSE '' END
       || w.words[1 + (r.id * 7 + x.a) %% w.n] || ' ' || w.words[1 + (r.id * 13) %% w.n]
       || ' ' || w.words[1 + (r.id * 31 + x.a) %% w.n] || ' request ' || r.id
       || CASE WHEN x.a = 1 THEN ': ' || repeat(w.words[1 + r.id %% w.n] || ' ', 12) ELSE '' END,
       r.id, CASE WHEN x.a = 0 THEN 20 ELSE 40 END, r.created_at
FROM session_requests r
CROSS JOIN (VALUES (0, 'user'), (1, 'assistant')) AS x(a, role)
CROSS JOIN (SELECT %(words)s::text[] AS words, %(nwords)s AS n) AS w
"""

SEQUENCES = """
SELECT setval(pg_get_serial_sequence('session_requests', 'id'),
              (SELECT coalesce(max(id), 1) FROM session_requests)),
       setval(pg_get_serial_sequence('session_messages', 'id'),
              (SELECT coalesce(max(id), 1) FROM session_messages)),
       setval(pg_get_serial_sequence('balance_ledger', 'id'),
              (SELECT coalesce(max(id), 1) FROM balance_ledger))
"""


def build(conn: Any, sessions: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill the migrated, empty database of `conn` (autocommit) with `sessions` sessions."""
    params = {
        "n": sessions,
        "per": REQUESTS_PER_SESSION,
        "deposit": DEPOSIT_SATS,
        "now": conn.execute("SELECT date_trunc('second', now())").fetchone()[0],
        "step": f"{DAYS * 86400 / sessions} seconds",
        "rare": RARE,
        "rare_every": max(sessions // 10, 1),
        "common": COMMON,
        "common_every": COMMON_EVERY,
        "words": list(WORDS),
        "nwords": len(WORDS),
    }
    started = time.perf_counter()
    conn.execute("SET maintenance_work_mem = '1GB'")
    conn.execute("SET work_mem = '256MB'")
    indexes = conn.execute(SECONDARY_INDEXES).fetchall()
    for name, _ in indexes:
        conn.execute(f"DROP INDEX {name}")
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")  # FKs and triggers off
        for label, sql in (("sessions", SESSIONS), ("requests", REQUESTS), ("ledger", LEDGER)):
            conn.execute(sql, params)
            log(f"  {label} loaded at {time.perf_counter() - started:.0f}s")
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(MESSAGES, params)
        conn.execute(SEQUENCES)
    log(f"  messages loaded at {time.perf_counter() - started:.0f}s")
    for name, definition in indexes:
        conn.execute(definition)
        log(f"  index {name} at {time.perf_counter() - started:.0f}s")
    conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")
    log(f"  vacuumed at {time.perf_counter() - started:.0f}s")
    counts = conn.execute(
        "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM session_requests),"
        " (SELECT count(*) FROM session_messages), (SELECT count(*) FROM balance_ledger)"
    ).fetchone()
    return {
        "sessions": counts[0],
        "requests": counts[1],
        "messages": counts[2],
        "ledger": counts[3],
        "buildSeconds": round(time.perf_counter() - started, 1),
    }
