-- towerctl:no-transaction
-- `session list --sort activity` pages the sessions by their last activity, newest first.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_activity_idx
    ON sessions (last_activity_at, id);
