-- Session requests: one row per request served (or refused) on a session,
-- with its outcome, its token counts and what it cost.
-- Keyed (session_id, id) so the table can be distributed by session_id.
CREATE TABLE IF NOT EXISTS session_requests (
    session_id     uuid        NOT NULL,
    id             bigint      GENERATED ALWAYS AS IDENTITY,
    state          text        NOT NULL,
    agent          text        NOT NULL,
    reason         text,
    error_message  text,
    input_tokens   integer     NOT NULL DEFAULT 0,
    output_tokens  integer     NOT NULL DEFAULT 0,
    cost_sats      bigint      NOT NULL DEFAULT 0,
    debited_sats   bigint      NOT NULL DEFAULT 0,
    balance_after_sats bigint,
    created_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    CONSTRAINT session_requests_pkey PRIMARY KEY (session_id, id),
    CONSTRAINT session_requests_session_fkey
        FOREIGN KEY (session_id) REFERENCES sessions (id),
    CONSTRAINT session_requests_state_check
        CHECK (state IN ('complete', 'rejected', 'failed')),
    CONSTRAINT session_requests_tokens_nonnegative
        CHECK (input_tokens >= 0 AND output_tokens >= 0),
    CONSTRAINT session_requests_debit_bounds
        CHECK (debited_sats >= 0 AND cost_sats >= 0 AND debited_sats <= cost_sats),
    CONSTRAINT session_requests_only_complete_debits
        CHECK (state = 'complete' OR debited_sats = 0)
);
