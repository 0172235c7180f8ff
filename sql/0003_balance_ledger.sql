-- The balance ledger: every change of a session's balance is a row here.
-- Invariant (checked by `towerctl doctor`):
--   sessions.balance_sats = sum(deposit) + sum(topup) - sum(debit)
-- A debit always points at the request that caused it.
CREATE TABLE IF NOT EXISTS balance_ledger (
    session_id          uuid        NOT NULL,
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    kind                text        NOT NULL,
    amount_sats         bigint      NOT NULL,
    session_request_id  bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT balance_ledger_pkey PRIMARY KEY (session_id, id),
    CONSTRAINT balance_ledger_session_fkey
        FOREIGN KEY (session_id) REFERENCES sessions (id),
    CONSTRAINT balance_ledger_request_fkey
        FOREIGN KEY (session_id, session_request_id)
        REFERENCES session_requests (session_id, id),
    CONSTRAINT balance_ledger_kind_check CHECK (kind IN ('deposit', 'topup', 'debit')),
    CONSTRAINT balance_ledger_amount_positive CHECK (amount_sats > 0),
    CONSTRAINT balance_ledger_debit_has_request
        CHECK ((kind = 'debit') = (session_request_id IS NOT NULL))
);

-- At most one debit per request.
CREATE UNIQUE INDEX IF NOT EXISTS balance_ledger_one_debit_per_request
    ON balance_ledger (session_id, session_request_id)
    WHERE kind = 'debit';
