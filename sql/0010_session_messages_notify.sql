-- `session messages --follow` wakes up when a session's messages commit: a
-- statement-level trigger notifies the channel `towerctl_session_<session id
-- without dashes>` once per session and statement (PostgreSQL folds repeats
-- within a transaction, and delivers nothing until the transaction commits).
-- Followers never depend on a notification alone: they also read by id on a
-- timer, so a lost one (or a pooler that drops LISTEN) only delays a message.
-- CREATE TRIGGER takes a short SHARE ROW EXCLUSIVE lock on session_messages;
-- the migration's lock timeout keeps it from queueing behind long writes.
CREATE OR REPLACE FUNCTION session_messages_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    sid uuid;
BEGIN
    FOR sid IN SELECT DISTINCT session_id FROM inserted LOOP
        PERFORM pg_notify('towerctl_session_' || replace(sid::text, '-', ''), '');
    END LOOP;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS session_messages_notify ON session_messages;
CREATE TRIGGER session_messages_notify
    AFTER INSERT ON session_messages
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION session_messages_notify();
