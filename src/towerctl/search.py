"""`session find`: PostgreSQL full-text search over message content (SPEC 16).

TEXT is read by `websearch_to_tsquery` ("quoted phrases", `or`, `-word`), in the
'simple' configuration (see sql/0016_session_messages_search.sql for why): lower-cased,
no stemming, no stop words, the same for every language. Matches come newest first
(message ids grow with time); a page ends with a cursor, the last match's id, and the
next page is `id < cursor`. Snippets come from `ts_headline`, the matched words
between `HIT_START` and `HIT_END`, characters that never reach it from the content
(they are taken out of the text the snippet is made from), so no message can forge a
highlight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from towerctl.errors import BadInput

if TYPE_CHECKING:
    import psycopg

MAX_PAGE = 1_000
INDEXED_CHARS = 100_000  # as in the index's expression (0016)
HIT_START, HIT_END = "\x02", "\x03"
ROLES = ("user", "assistant")
STATES = ("awaiting_payment", "active", "paused", "expired")

QUERY_WORDS = "SELECT numnode(websearch_to_tsquery('simple', %s))"
# The expression is the index's, character for character, so the planner uses it; the
# query is written out (not taken from q) so that the planner sees the words and reads
# them from the index (a query it cannot see looks like one that matches everything:
# it then sorts every message).
FIND = """
WITH q AS (SELECT websearch_to_tsquery('simple', %(text)s) AS q),
page AS (
    SELECT m.session_id, m.id, m.role, m.created_at, m.content
    FROM session_messages m
    WHERE to_tsvector('simple'::regconfig, left(m.content, 100000))
          @@ websearch_to_tsquery('simple', %(text)s)
      AND (%(after)s::bigint IS NULL OR m.id < %(after)s)
      AND (%(since)s::timestamptz IS NULL OR m.created_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR m.created_at < %(until)s)
      AND (%(role)s::text IS NULL OR m.role = %(role)s)
      AND (%(state)s::text IS NULL OR EXISTS (
          SELECT 1 FROM sessions s
          WHERE s.id = m.session_id
            AND CASE WHEN s.state <> 'expired' AND s.expires_at <= now() THEN 'expired'
                     ELSE s.state END = %(state)s))
    ORDER BY m.id DESC
    LIMIT %(limit)s
)
SELECT page.session_id, page.id, page.role, page.created_at,
       ts_headline('simple',
                   translate(left(page.content, 100000), E'\\x02\\x03', '  '),
                   q.q,
                   'StartSel="' || E'\\x02' || '", StopSel="' || E'\\x03' || '", '
                   'MaxWords=24, MinWords=10, MaxFragments=2, FragmentDelimiter=" … "')
FROM page, q
ORDER BY page.id DESC"""


@dataclass(frozen=True)
class Match:
    session_id: UUID
    message_id: int
    role: str
    created_at: datetime
    snippet: str  # the matched words between HIT_START and HIT_END

    def as_json(self) -> dict[str, Any]:
        return {
            "sessionId": str(self.session_id),
            "messageId": self.message_id,
            "role": self.role,
            "createdAt": self.created_at,
            "snippet": marked(self.snippet, "«", "»"),
        }

    def parts(self) -> list[tuple[str, bool]]:
        """The snippet as (text, highlighted) pieces, whitespace runs made one space."""
        flat = re.sub(r"\s+", " ", self.snippet).strip()
        pieces: list[tuple[str, bool]] = []
        for i, chunk in enumerate(re.split(f"[{HIT_START}{HIT_END}]", flat)):
            if chunk:
                pieces.append((chunk, i % 2 == 1))
        return pieces


def marked(snippet: str, start: str, end: str) -> str:
    flat = re.sub(r"\s+", " ", snippet).strip()
    return flat.replace(HIT_START, start).replace(HIT_END, end)


@dataclass(frozen=True)
class Page:
    matches: tuple[Match, ...]
    next_cursor: int | None

    def as_json(self) -> dict[str, Any]:
        return {"matches": [m.as_json() for m in self.matches], "nextCursor": self.next_cursor}


def find_messages(
    conn: psycopg.Connection,
    text: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    state: str | None = None,
    role: str | None = None,
    limit: int = 20,
    after: int | None = None,
) -> Page:
    """Messages matching `text`, newest first, at most `limit`; `after` is the cursor
    of the page before (only older messages)."""
    if not 1 <= limit <= MAX_PAGE:
        raise BadInput(f"--limit must be from 1 to {MAX_PAGE}")
    if role is not None and role not in ROLES:
        raise BadInput(f"--role must be one of {', '.join(ROLES)}")
    if state is not None and state not in STATES:
        raise BadInput(f"--state must be one of {', '.join(STATES)}")
    if since is not None and until is not None and since >= until:
        raise BadInput("--since must be before --until")
    if "\x00" in text:
        raise BadInput("the search text holds a NUL character")
    row = conn.execute(QUERY_WORDS, (text,)).fetchone()
    if row is None or not row[0]:
        raise BadInput("the search text has no words to look for")
    params = {
        "text": text,
        "after": after,
        "since": since,
        "until": until,
        "role": role,
        "state": state,
        "limit": limit + 1,
    }
    rows = conn.execute(FIND, params).fetchall()
    matches = tuple(Match(*r) for r in rows[:limit])
    more = len(rows) > limit
    return Page(matches, matches[-1].message_id if more and matches else None)
