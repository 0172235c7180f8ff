-- Sessions: a pre-funded balance in sats that requests debit.
-- The balance can never go negative; the state machine is enforced here, not
-- only in application code.
CREATE TABLE IF NOT EXISTS sessions (
    id               uuid        NOT NULL DEFAULT gen_random_uuid(),
    state            text        NOT NULL DEFAULT 'awaiting_payment',
    balance_sats     bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_activity_at timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    CONSTRAINT sessions_pkey PRIMARY KEY (id),
    CONSTRAINT sessions_state_check
        CHECK (state IN ('awaiting_payment', 'active', 'paused', 'expired')),
    CONSTRAINT sessions_balance_nonnegative CHECK (balance_sats >= 0),
    CONSTRAINT sessions_expiry_after_creation CHECK (expires_at >= created_at)
);
