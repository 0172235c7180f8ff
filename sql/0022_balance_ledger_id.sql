-- towerctl:no-transaction
-- `doctor` reads the ledger rows written since its last clean run.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS balance_ledger_id_idx
    ON balance_ledger (id);
