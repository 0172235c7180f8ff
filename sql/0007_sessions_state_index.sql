-- towerctl:no-transaction
-- `session list --state` and the expiry sweep read sessions by state and
-- expiry; built CONCURRENTLY so a live primary keeps taking writes.
-- (If a previous attempt failed it may have left an INVALID index of this
-- name: drop it and run `towerctl migrate` again.)
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_state_expires_idx
    ON sessions (state, expires_at);
