-- The request guard: a lease on the session row instead of a session-level
-- advisory lock, so it holds through a transaction-pooling PgBouncer and frees
-- itself when a process dies (the lease simply runs out).
-- `lease_owner` is a random id of the request in flight; `lease_until` is the
-- server's time at which the lease ends. Both NULL when nobody holds it.
-- Nullable columns without a default: no table rewrite, safe on a live primary.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS lease_owner uuid;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS lease_until timestamptz;
