-- 0011's towerctl_record_request, replaced by 0012's towerctl_write_request and called
-- by nothing since. Dropping a function takes no table lock: safe on a live primary.
DROP FUNCTION IF EXISTS towerctl_record_request(
    uuid, uuid, text, text, text, text, integer, integer, bigint, text, text, boolean,
    bigint, text, integer, text, integer);
