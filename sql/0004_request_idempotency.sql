-- Idempotency keys: a retried request with the same key returns the first
-- outcome. Keys are unique per session (never globally), so the constraint
-- stays local to one shard when the store is distributed by session_id.
ALTER TABLE session_requests
    ADD COLUMN IF NOT EXISTS idempotency_key text;

-- SHA-256 of the message, so a key reused for a different message is refused
-- instead of silently returning the first outcome.
ALTER TABLE session_requests
    ADD COLUMN IF NOT EXISTS message_sha256 text;

ALTER TABLE session_requests
    DROP CONSTRAINT IF EXISTS session_requests_idempotency_key_length;
ALTER TABLE session_requests
    ADD CONSTRAINT session_requests_idempotency_key_length
    CHECK (idempotency_key IS NULL OR char_length(idempotency_key) BETWEEN 1 AND 200);

ALTER TABLE session_requests
    DROP CONSTRAINT IF EXISTS session_requests_idempotency_key_unique;
ALTER TABLE session_requests
    ADD CONSTRAINT session_requests_idempotency_key_unique
    UNIQUE (session_id, idempotency_key);
