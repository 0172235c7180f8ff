"""A session's messages: what to read (`selection`), writing them out in a format
(`export`), following new ones as they arrive (`follow`), clearing a session's history
(`history`) and purging expired sessions' histories (`purge`)."""

from towerctl.transcripts.selection import (
    CHUNK_ROWS,
    FORMULA_STARTS,
    MAX_PAGE,
    MESSAGE_JSON,
    REQUEST_STATE,
    ROLES,
    Format,
    Message,
    Selection,
    check_selection,
    copy_query,
    count,
    next_cursor,
    rows_query,
    tail,
)

__all__ = [
    "CHUNK_ROWS",
    "FORMULA_STARTS",
    "MAX_PAGE",
    "MESSAGE_JSON",
    "REQUEST_STATE",
    "ROLES",
    "Format",
    "Message",
    "Selection",
    "check_selection",
    "copy_query",
    "count",
    "next_cursor",
    "rows_query",
    "tail",
]
