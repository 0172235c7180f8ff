-- towerctl:no-transaction
-- `report --since 1d` reads one window of the ledger. Built CONCURRENTLY so a live
-- primary keeps taking writes (an INVALID index left by a failed attempt: drop it and
-- run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS balance_ledger_created_idx
    ON balance_ledger (created_at);
