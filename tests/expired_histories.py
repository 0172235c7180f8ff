"""Sessions expired long ago with their histories, seeded by SQL (generate_series): for
the purge tests and `bench/purge_throughput.py`. Each request has its user and assistant
message, as a request writes them, so `doctor` finds the store consistent."""

from __future__ import annotations

import psycopg

SEED = """
WITH s AS (
    INSERT INTO sessions (state, balance_sats, created_at, last_activity_at, expires_at)
    SELECT 'expired', 0, now() - %(ago)s::interval - interval '2 days',
           now() - %(ago)s::interval - interval '1 day', now() - %(ago)s::interval
    FROM generate_series(1, %(sessions)s)
    RETURNING id
), r AS (
    INSERT INTO session_requests (session_id, state, agent, completed_at)
    SELECT s.id, 'complete', 'seed', now() FROM s, generate_series(1, %(requests)s)
    RETURNING session_id, id
)
INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
SELECT r.session_id, m.role, repeat(m.role || ' text ', %(repeat)s) || 'of request ' || r.id,
       r.id, %(tokens)s
FROM r, (VALUES (1, 'user'), (2, 'assistant')) AS m(ord, role)
ORDER BY r.id, m.ord"""


def seed_expired(
    conn: psycopg.Connection,
    sessions: int,
    requests: int,
    ago: str = "30 days",
    *,
    repeat: int = 1,
    tokens: int = 4,
) -> None:
    """`sessions` sessions expired `ago`, each with `requests` requests; a message reads
    `<role> text of request <id>`, its first words repeated `repeat` times, and counts
    `tokens` tokens. Returns nothing; the caller counts."""
    conn.execute(
        SEED,
        {"sessions": sessions, "requests": requests, "ago": ago, "repeat": repeat,
         "tokens": tokens},
    )  # fmt: skip
