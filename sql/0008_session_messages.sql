-- The seed change: a session's conversation history, kept apart from its
-- requests so the history carries no billing data. Each message points back
-- to the request that produced it. Rejected and failed requests are written
-- too, so the transcript shows what the user was told.
CREATE TABLE IF NOT EXISTS session_messages (
    session_id          uuid        NOT NULL,
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    role                text        NOT NULL,
    content             text        NOT NULL,
    session_request_id  bigint      NOT NULL,
    token_count         integer     NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT session_messages_pkey PRIMARY KEY (session_id, id),
    CONSTRAINT session_messages_session_fkey
        FOREIGN KEY (session_id) REFERENCES sessions (id),
    CONSTRAINT session_messages_request_fkey
        FOREIGN KEY (session_id, session_request_id)
        REFERENCES session_requests (session_id, id),
    CONSTRAINT session_messages_role_check CHECK (role IN ('user', 'assistant')),
    CONSTRAINT session_messages_content_not_empty CHECK (content <> ''),
    CONSTRAINT session_messages_token_count_nonnegative CHECK (token_count >= 0)
);

-- The primary key (session_id, id) already serves "one session's history in
-- id order"; this index serves reads by time and the expiry sweep.
CREATE INDEX IF NOT EXISTS session_messages_session_created_idx
    ON session_messages (session_id, created_at, id);

-- Messages of one request (idempotent replay, doctor).
CREATE INDEX IF NOT EXISTS session_messages_request_idx
    ON session_messages (session_id, session_request_id);
