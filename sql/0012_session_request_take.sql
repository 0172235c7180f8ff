-- The start of a request as one plpgsql function (the write is 0011's): take the
-- session's lease and read what the request needs under it, in one call whose plans
-- the server keeps for the life of a server connection. Without prepared statements
-- (a transaction-pooling PgBouncer cannot keep them) the take and the history read
-- sent as text were planned on every request.
--
-- One row, or none when there is no such session:
-- - out_outcome 'busy': another request holds the lease; out_left is how many
--   seconds it still runs (nothing was changed);
-- - 'held': the lease is this caller's (p_me) for p_hold seconds; the state as a
--   reader sees it (expired once its time has come), the balance, the last
--   p_context messages newest first, and the first outcome of p_key if there is one;
-- - 'released': as 'held', but the lease was given back in the same transaction
--   because nothing is to be written (the key was used before, or the session is
--   not active), so the caller has nothing to release.
-- The session's lease columns are 0009's. CREATE OR REPLACE: safe on a live primary.
CREATE OR REPLACE FUNCTION towerctl_take_request(
    p_sid uuid,
    p_me uuid,
    p_hold double precision,
    p_key text,
    p_context integer
) RETURNS TABLE (out_outcome text, out_left double precision, out_state text,
                 out_balance bigint, out_roles text[], out_contents text[],
                 out_tokens integer[], out_replay_id bigint, out_replay_state text,
                 out_replay_reason text, out_replay_error text, out_replay_debited bigint,
                 out_replay_balance bigint, out_replay_in integer, out_replay_out integer,
                 out_replay_digest text, out_replay_reply text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $function$
BEGIN
    UPDATE sessions
    SET lease_owner = p_me, lease_until = now() + make_interval(secs => p_hold)
    WHERE id = p_sid AND (lease_until IS NULL OR lease_until < now())
    RETURNING CASE WHEN state <> 'expired' AND expires_at <= now() THEN 'expired'
                   ELSE state END,
              balance_sats
    INTO out_state, out_balance;
    IF NOT FOUND THEN
        SELECT greatest(extract(epoch FROM lease_until - now()), 0)::float8
        INTO out_left FROM sessions WHERE id = p_sid;
        IF FOUND THEN
            out_outcome := 'busy';
            RETURN NEXT;
        END IF;
        RETURN;
    END IF;
    out_outcome := 'held';
    IF p_key IS NOT NULL THEN
        SELECT r.id, r.state, r.reason, r.error_message, r.debited_sats,
               r.balance_after_sats, r.input_tokens, r.output_tokens, r.message_sha256,
               (SELECT m.content FROM session_messages m
                WHERE m.session_id = r.session_id AND m.session_request_id = r.id
                  AND m.role = 'assistant' LIMIT 1)
        INTO out_replay_id, out_replay_state, out_replay_reason, out_replay_error,
             out_replay_debited, out_replay_balance, out_replay_in, out_replay_out,
             out_replay_digest, out_replay_reply
        FROM session_requests r WHERE r.session_id = p_sid AND r.idempotency_key = p_key;
    END IF;
    IF out_replay_id IS NOT NULL OR out_state <> 'active' THEN
        UPDATE sessions SET lease_owner = NULL, lease_until = NULL
        WHERE id = p_sid AND lease_owner = p_me;
        out_outcome := 'released';
    END IF;
    IF out_outcome = 'held' THEN
        SELECT array_agg(h.role ORDER BY h.id DESC), array_agg(h.content ORDER BY h.id DESC),
               array_agg(h.token_count ORDER BY h.id DESC)
        INTO out_roles, out_contents, out_tokens
        FROM (SELECT m.id, m.role, m.content, m.token_count FROM session_messages m
              WHERE m.session_id = p_sid ORDER BY m.id DESC LIMIT p_context) AS h;
    END IF;
    RETURN NEXT;
END
$function$;
