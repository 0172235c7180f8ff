-- towerctl:no-transaction
-- `report --since 1d` counts one window of the requests by state and by agent: with
-- both in the index it reads the index alone, not a heap page for every row of the
-- window. It takes the place of `session_requests_created_idx` (dropped by 0029 once
-- this one is built), so a request's write still updates one index on created_at.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_requests_created_states_idx
    ON session_requests (created_at) INCLUDE (state, agent);
