-- Revoked macaroons, by identifier: revoking one token revokes every token
-- attenuated from it (they share the identifier). Small and session-less, so a
-- reference table when the store is distributed.
CREATE TABLE IF NOT EXISTS macaroon_revocations (
    identifier  text        NOT NULL,
    session_id  uuid,
    revoked_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT macaroon_revocations_pkey PRIMARY KEY (identifier)
);
