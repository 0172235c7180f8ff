-- towerctl:no-transaction
-- `doctor` reads the sessions opened since its last clean run; `session list` pages
-- them newest first.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS sessions_created_idx
    ON sessions (created_at, id);
