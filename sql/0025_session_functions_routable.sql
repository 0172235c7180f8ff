-- The request functions of 0012 rewritten, and a top-up as a function, so that a distributed store (Citus, the
-- session id as distribution column) can route every statement in them to the one
-- node that holds the session, with the same results on a single server:
--
-- - the clock is read once (`now()`: the transaction's start, as before) into a
--   variable, and every time derived from it is computed in plpgsql; the statements
--   receive them as parameters, so no statement on a session's row carries a
--   function that is not immutable in a RETURNING list or a CASE (a distributed
--   UPDATE refuses those);
-- - no `SET plan_cache_mode` on the functions (a function-level setting sends Citus
--   13.2's router planner down a path that crashes the node running it); each
--   statement in a plpgsql function is still planned once per connection and kept;
-- - a request's messages are written by one plain INSERT each, and the write notifies
--   `session messages --follow` itself (the trigger of 0010 stays for other writers;
--   a distributed store drops it).
--
-- towerctl_take_lease is the lease rule alone, for a request and for a history
-- clear alike (one rule, in one place): take the lease on a session for p_hold
-- seconds when it is free (or already the caller's), unless another waiter asked for
-- it next; otherwise ask for it next (when p_want > 0) and say how long it may stay
-- busy. One row ('held', NULL) or ('busy', seconds left), none when there is no such
-- session.
--
-- towerctl_top_up: a top-up's balance change and its ledger row in one call (the ledger
-- row names the session by value, so both rows are written on the node that holds the
-- session, in one transaction there). The session as it stands after, or no row when
-- there is no such session or it takes no top-up (expired).
--
-- CREATE OR REPLACE keeps the callers' signatures: no table lock, safe on a live
-- primary; a request in flight finishes with the old body.

CREATE OR REPLACE FUNCTION towerctl_take_lease(
    p_sid uuid,
    p_me uuid,
    p_hold double precision,
    p_want double precision
) RETURNS TABLE (out_outcome text, out_left double precision)
LANGUAGE plpgsql
AS $function$
DECLARE
    v_now timestamptz := now();
    v_until timestamptz := now() + make_interval(secs => p_hold);
    v_want_until timestamptz := now() + make_interval(secs => greatest(p_want, 0));
    v_lease_until timestamptz;
    v_wanted_by uuid;
    v_wanted_until timestamptz;
BEGIN
    UPDATE sessions
    SET lease_owner = p_me, lease_until = v_until,
        lease_wanted_by = NULL, lease_wanted_until = NULL
    WHERE id = p_sid
      AND (lease_until IS NULL OR lease_until < v_now OR lease_owner = p_me)
      AND (lease_wanted_until IS NULL OR lease_wanted_until < v_now OR lease_wanted_by = p_me);
    IF FOUND THEN
        out_outcome := 'held';
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_want > 0 THEN  -- ask for the lease next, unless another waiter asked first
        UPDATE sessions
        SET lease_wanted_by = p_me, lease_wanted_until = v_want_until
        WHERE id = p_sid AND (lease_wanted_until IS NULL OR lease_wanted_until < v_now
                              OR lease_wanted_by = p_me);
    END IF;
    SELECT lease_until, lease_wanted_by, lease_wanted_until
    INTO v_lease_until, v_wanted_by, v_wanted_until
    FROM sessions WHERE id = p_sid;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- how long until it may be free: the holder's lease, or another waiter's ask
    out_outcome := 'busy';
    out_left := greatest(coalesce(extract(epoch FROM v_lease_until - v_now), 0),
                         CASE WHEN v_wanted_by <> p_me
                              THEN coalesce(extract(epoch FROM v_wanted_until - v_now), 0)
                         END,
                         0)::float8;
    RETURN NEXT;
END
$function$;

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
AS $function$
DECLARE
    v_now timestamptz := now();
    v_expires timestamptz;
BEGIN
    SELECT l.out_outcome, l.out_left INTO out_outcome, out_left
    FROM towerctl_take_lease(p_sid, p_me, p_hold, p_want) AS l;
    IF NOT FOUND THEN
        RETURN;  -- no such session
    END IF;
    IF out_outcome = 'busy' THEN
        RETURN NEXT;
        RETURN;
    END IF;
    -- held: the state as a reader sees it (expired once its time has come), the balance
    SELECT state, expires_at, balance_sats INTO out_state, v_expires, out_balance
    FROM sessions WHERE id = p_sid;
    IF out_state <> 'expired' AND v_expires <= v_now THEN
        out_state := 'expired';
    END IF;
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
AS $function$
DECLARE
    v_now timestamptz := now();
    v_balance bigint;
    v_state text;
    v_expires timestamptz;
    v_wanted_by uuid;
    v_wanted_until timestamptz;
    v_lease_until timestamptz;
    v_lease_owner uuid;
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
            out_debited_sats, out_balance_after_sats, p_key, p_digest, v_now)
    RETURNING id INTO out_request_id;
    IF v_state = 'expired' OR v_expires <= v_now THEN
        out_state := 'expired';
    ELSE
        out_state := CASE WHEN p_pause OR out_balance_after_sats < p_floor THEN 'paused'
                          ELSE v_state END;
        v_expires := v_now + interval '24 hours';
    END IF;
    out_renewed := p_renew IS NOT NULL AND out_state = 'active'
        AND (v_wanted_until IS NULL OR v_wanted_until < v_now OR v_wanted_by = p_me);
    IF out_renewed THEN
        v_lease_owner := p_me;
        v_lease_until := v_now + make_interval(secs => p_renew);
    END IF;
    UPDATE sessions
    SET balance_sats = out_balance_after_sats,
        state = out_state,
        last_activity_at = v_now,
        expires_at = v_expires,
        lease_owner = v_lease_owner,
        lease_until = v_lease_until
    WHERE id = p_sid;
    IF out_debited_sats > 0 THEN
        INSERT INTO balance_ledger (session_id, kind, amount_sats, session_request_id)
        VALUES (p_sid, 'debit', out_debited_sats, out_request_id);
    END IF;
    -- one statement per message, the user's first (ids in that order): each a plain
    -- INSERT of values, which a distributed store sends to the session's node as it is
    IF p_user <> '' THEN
        INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
        VALUES (p_sid, 'user', p_user, out_request_id, p_user_tokens);
    END IF;
    IF p_reply <> '' THEN
        INSERT INTO session_messages (session_id, role, content, session_request_id, token_count)
        VALUES (p_sid, 'assistant', p_reply, out_request_id, p_reply_tokens);
    END IF;
    IF p_user <> '' OR p_reply <> '' THEN
        -- wakes `session messages --follow` (as 0010's trigger does; PostgreSQL delivers
        -- one of the two at commit): on a distributed store the trigger is gone and this
        -- function runs on the coordinator, where the followers listen
        PERFORM pg_notify('towerctl_session_' || replace(p_sid::text, '-', ''), '');
    END IF;
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

CREATE OR REPLACE FUNCTION towerctl_top_up(p_sid uuid, p_sats bigint)
RETURNS TABLE (out_id uuid, out_state text, out_balance bigint, out_created_at timestamptz,
               out_expires_at timestamptz, out_last_activity_at timestamptz)
LANGUAGE plpgsql
AS $function$
DECLARE
    v_now timestamptz := now();
    v_expires timestamptz := now() + interval '24 hours';
BEGIN
    UPDATE sessions
    SET balance_sats = balance_sats + p_sats,
        state = CASE WHEN state IN ('paused', 'awaiting_payment') THEN 'active' ELSE state END,
        last_activity_at = v_now,
        expires_at = v_expires
    WHERE id = p_sid AND state <> 'expired' AND expires_at > v_now
    RETURNING id, state, balance_sats, created_at, expires_at, last_activity_at
    INTO out_id, out_state, out_balance, out_created_at, out_expires_at, out_last_activity_at;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO balance_ledger (session_id, kind, amount_sats) VALUES (p_sid, 'topup', p_sats);
    RETURN NEXT;
END
$function$;
