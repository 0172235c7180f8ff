-- towerctl:no-transaction
-- A request's messages by role, in (session, request, role) order: `doctor --full`
-- reads this index alone, in order, to find a request with two messages of one role, a
-- request without its user message and a message without its request, with no sort,
-- no hash table and no heap page. It takes the place of `session_messages_request_idx`
-- (its first two columns, dropped by 0029 once this one is built), so a message's write
-- still updates one index of its request.
-- Built CONCURRENTLY so a live primary keeps taking writes (an INVALID index left by a
-- failed attempt: drop it and run `towerctl migrate` again).
CREATE INDEX CONCURRENTLY IF NOT EXISTS session_messages_request_role_idx
    ON session_messages (session_id, session_request_id, role);
