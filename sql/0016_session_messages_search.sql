-- towerctl:no-transaction
-- `session find`: full-text search over message content. Built CONCURRENTLY so a live
-- primary keeps taking writes. (If a previous attempt failed it may have left an
-- INVALID index of this name: drop it and run `towerctl migrate` again.) One index per
-- file: a no-transaction file runs its statements one by one, and each such index is
-- best retried alone.
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

