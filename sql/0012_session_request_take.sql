-- A request in two calls at most, both plpgsql functions whose plans the server keeps
-- for the life of a server connection (without prepared statements, which a
-- transaction-pooling PgBouncer cannot keep, statements sent as text are planned on
-- every request), and in a batch usually one:
--
-- towerctl_take_request: take the session's lease and read what the request needs
-- under it. One row, or none when there is no such session:
-- - out_outcome 'busy': another request holds the lease (or a waiter has asked for it
--   next, below); out_left is how many seconds the holder's lease still runs;
-- - 'held': the lease is the caller's (p_me) for p_hold seconds; the state as a
--   reader sees it (expired once its time has come), the balance, the last
--   p_context messages newest first, and the first outcome of p_key if there is one;
-- - 'released': as 'held', but the lease was given back in the same transaction
--   because nothing is to be written (the key was used before, or the session is
--   not active), so the caller has nothing to release.
-- The caller's own lease is taken again (extended): a batch that kept it.
--
-- towerctl_write_request: 0011's write (only while the caller holds the lease; no
-- row otherwise) as plain statements, which either gives the lease back or, when
-- p_renew is given and the session stays active, keeps it for p_renew more seconds
-- and returns the history the next request of a batch needs: that request then
-- starts without a round trip of its own.
--
-- Waiters are not starved by a batch that keeps its lease: a request that finds the
-- lease busy and will wait asks for it next (lease_wanted_by/_until, for p_want
-- seconds, longer than a waiter's longest pause between tries); while that stands,
-- a write does not keep the lease and nobody else takes it. The first waiter's ask
-- stands; it ends when that waiter takes the lease, or runs out (a waiter that gave
-- up or died delays the others by at most p_want seconds).
--
-- Nullable columns without a default: no table rewrite. CREATE OR REPLACE: no table
-- lock. Safe on a live primary.
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS lease_wanted_by uuid;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS lease_wanted_until timestamptz;

CREATE OR REPLACE FUNCTION towerctl_take_request(
    p_sid uuid,
    p_me uuid,
    p_hold double precision,
    p_key text,
    p_context integer,
    p_want double precision
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
    SET lease_owner = p_me, lease_until = now() + make_interval(secs => p_hold),
        lease_wanted_by = NULL, lease_wanted_until = NULL
    WHERE id = p_sid
      AND (lease_until IS NULL OR lease_until < now() OR lease_owner = p_me)
      AND (lease_wanted_until IS NULL OR lease_wanted_until < now() OR lease_wanted_by = p_me)
    RETURNING CASE WHEN state <> 'expired' AND expires_at <= now() THEN 'expired'
                   ELSE state END,
              balance_sats
    INTO out_state, out_balance;
    IF NOT FOUND THEN
        IF p_want > 0 THEN  -- ask for the lease next, unless another waiter asked first
            UPDATE sessions
            SET lease_wanted_by = p_me,
                lease_wanted_until = now() + make_interval(secs => p_want)
            WHERE id = p_sid AND (lease_wanted_until IS NULL OR lease_wanted_until < now()
                                  OR lease_wanted_by = p_me);
        END IF;
        -- how long until it may be free: the holder's lease, or another waiter's ask
        SELECT greatest(coalesce(extract(epoch FROM lease_until - now()), 0),
                        CASE WHEN lease_wanted_by <> p_me
                             THEN coalesce(extract(epoch FROM lease_wanted_until - now()), 0)
                        END,
                        0)::float8
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

CREATE OR REPLACE FUNCTION towerctl_write_request(
    p_sid uuid,
    p_me uuid,
    p_state text,
    p_agent text,
    p_reason text,
    p_error text,
    p_in integer,
    p_out integer,
    p_cost bigint,
    p_key text,
    p_digest text,
    p_pause boolean,
    p_floor bigint,
    p_user text,
    p_user_tokens integer,
    p_reply text,
    p_reply_tokens integer,
    p_renew double precision,
    p_context integer
) RETURNS TABLE (out_request_id bigint, out_debited_sats bigint,
                 out_balance_after_sats bigint, out_state text, out_renewed boolean,
                 out_roles text[], out_contents text[], out_tokens integer[])
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $function$
DECLARE
    v_balance bigint;
    v_state text;
    v_expires timestamptz;
    v_wanted_by uuid;
    v_wanted_until timestamptz;
BEGIN
    -- only while this request holds the lease: a lost lease writes nothing
    SELECT balance_sats, state, expires_at, lease_wanted_by, lease_wanted_until
    INTO v_balance, v_state, v_expires, v_wanted_by, v_wanted_until
    FROM sessions WHERE id = p_sid AND lease_owner = p_me FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    out_debited_sats := CASE WHEN p_state = 'complete' THEN least(p_cost, v_balance) ELSE 0 END;
    out_balance_after_sats := v_balance - out_debited_sats;
    INSERT INTO session_requests (
        session_id, state, agent, reason, error_message, input_tokens, output_tokens,
        cost_sats, debited_sats, balance_after_sats, idempotency_key, message_sha256,
        completed_at)
    VALUES (p_sid, p_state, p_agent, p_reason, p_error, p_in, p_out, p_cost,
            out_debited_sats, out_balance_after_sats, p_key, p_digest, now())
    RETURNING id INTO out_request_id;
    IF v_state = 'expired' OR v_expires <= now() THEN
        out_state := 'expired';
    ELSE
        out_state := CASE WHEN p_pause OR out_balance_after_sats < p_floor THEN 'paused'
                          ELSE v_state END;
        v_expires := now() + interval '24 hours';
    END IF;
    out_renewed := p_renew IS NOT NULL AND out_state = 'active'
        AND (v_wanted_until IS NULL OR v_wanted_until < now() OR v_wanted_by = p_me);
    UPDATE sessions
    SET balance_sats = out_balance_after_sats,
        state = out_state,
        last_activity_at = now(),
        expires_at = v_expires,
        lease_owner = CASE WHEN out_renewed THEN p_me END,
        lease_until = CASE WHEN out_renewed THEN now() + make_interval(secs => p_renew) END
    WHERE id = p_sid;
    IF out_debited_sats > 0 THEN
        INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)
        VALUES (p_sid, 'debit', out_debited_sats, out_request_id);
    END IF;
    INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
    SELECT p_sid, m.role, m.content, out_request_id, m.tokens
    FROM (VALUES (1, 'user', p_user, p_user_tokens),
                 (2, 'assistant', p_reply, p_reply_tokens)) AS m(ord, role, content, tokens)
    WHERE m.content <> ''
    ORDER BY m.ord;
    IF out_renewed THEN
        SELECT array_agg(h.role ORDER BY h.id DESC), array_agg(h.content ORDER BY h.id DESC),
               array_agg(h.token_count ORDER BY h.id DESC)
        INTO out_roles, out_contents, out_tokens
        FROM (SELECT m.id, m.role, m.content, m.token_count FROM session_messages m
              WHERE m.session_id = p_sid ORDER BY m.id DESC LIMIT p_context) AS h;
    END IF;
    RETURN NEXT;
END
$function$;
