-- towerctl:no-transaction
-- `report --since 1d` sums one window of the ledger by kind: with the kind and the
-- amount in the index it reads the index alone, not a heap page for every row of the
-- window. It takes the place of `balance_ledger_created_idx` (dropped by 0029 once this
-- one is built), so a ledger write still updates one index on created_at.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS balance_ledger_created_amounts_idx
    ON balance_ledger (created_at) INCLUDE (kind, amount_sats);
