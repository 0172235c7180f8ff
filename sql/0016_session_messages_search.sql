-- towerctl:no-transaction
-- `session find`: full-text search over message content, and `report`'s windows.
-- Built CONCURRENTLY so a live primary keeps taking writes. (If a previous attempt
-- failed it may have left an INVALID index of one of these names: drop it and run
-- `towerctl migrate` again.)
--
-- The 'simple' configuration: messages come in every language, and support searches
-- for the words a customer used; 'simple' lower-cases without stemming or stop words,
-- the same for every language, and names the configuration explicitly (an expression
-- index may not depend on default_text_search_config). Only the first 100,000
-- characters of a message are indexed, so that no message (up to 1,000,000 characters)
-- can exceed a tsvector's 1 MB and fail its write. `towerctl.search` uses the same
-- expression.
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_messages_content_search_idx
    ON session_messages USING gin (to_tsvector('simple'::regconfig, left(content, 100000)));

-- `report --since 1d` reads one window of the ledger and of the requests.
CREATE INDEX CONCURRENTLY IF NOT EXISTS balance_ledger_created_idx
    ON balance_ledger (created_at);
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_requests_created_idx
    ON session_requests (created_at);
