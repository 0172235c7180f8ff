-- 0004's UNIQUE (session_id, idempotency_key) constraint, now kept by 0013's partial
-- unique index (see there why). A brief ACCESS EXCLUSIVE lock on session_requests,
-- within the migration lock timeout; nothing is rewritten.
ALTER TABLE session_requests
    DROP CONSTRAINT IF EXISTS session_requests_idempotency_key_unique;
