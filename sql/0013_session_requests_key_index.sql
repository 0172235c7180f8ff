-- towerctl:no-transaction
-- Idempotency keys get a partial unique index (only requests that carry a key), built
-- without blocking writes. It replaces 0004's UNIQUE (session_id, idempotency_key)
-- constraint, dropped by 0014 once this index exists, so keys stay unique throughout.
--
-- Why: the constraint's index also starts with session_id. On tables the planner has no
-- statistics for yet (a new store, before autovacuum's first ANALYZE), it chose that
-- index for the foreign-key checks of every request's ledger row and messages
-- (session_requests (session_id, id)), filtering id by hand: each check read every
-- earlier request of the session. A batch of 3,000 on a fresh store went from 2.4 to
-- 4.4 ms per request; with this index it stays at about 1.5 ms (the partial index
-- cannot answer a query that does not say idempotency_key IS NOT NULL).
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS session_requests_idempotency_key_idx
    ON session_requests (session_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
