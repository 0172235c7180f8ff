-- towerctl:no-transaction
-- `doctor` reads the messages written since its last clean run.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_messages_id_idx
    ON session_messages (id);
