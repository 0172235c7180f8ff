-- towerctl:no-transaction
-- `report --since 1d` reads one window of the requests. Built CONCURRENTLY so a live
-- primary keeps taking writes (an INVALID index left by a failed attempt: drop it and
-- run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_requests_created_idx
    ON session_requests (created_at);
