-- A record of every `clear-history`: when a session's messages were deleted
-- and which token asked, so `doctor` can tell a cleared history from a lost
-- message.
CREATE TABLE IF NOT EXISTS session_history_clears (
    session_id          uuid        NOT NULL,
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    cleared_at          timestamptz NOT NULL DEFAULT now(),
    macaroon_identifier text        NOT NULL,
    messages_deleted    bigint      NOT NULL DEFAULT 0,
    last_request_id     bigint,
    CONSTRAINT session_history_clears_pkey PRIMARY KEY (session_id, id),
    CONSTRAINT session_history_clears_session_fkey
        FOREIGN KEY (session_id) REFERENCES sessions (id)
);
