-- towerctl:no-transaction
-- `doctor` reads the requests written since its last clean run. A BRIN index: ids
-- grow with the table, so it is small and cheap to keep up, and it orders nothing, so
-- a query sorting by id with a LIMIT (`session find`) is not drawn into walking it.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_requests_id_idx
    ON session_requests USING brin (id);
