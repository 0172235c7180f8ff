-- towerctl:no-transaction
-- The indexes that 0026, 0027 and 0028 take the place of: each new one starts with the
-- same columns, so every read the old one served it serves, and a write updates one
-- index instead of two. Dropped in a file of their own, after the new ones are built
-- and valid: a failed build stops the run before this file, and the old index stays.
DROP INDEX CONCURRENTLY IF EXISTS balance_ledger_created_idx;
DROP INDEX CONCURRENTLY IF EXISTS session_requests_created_idx;
DROP INDEX CONCURRENTLY IF EXISTS session_messages_request_idx;
