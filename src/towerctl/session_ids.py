"""Session ids as operators type them: a whole UUID, or a unique prefix of 8+ hex digits.

Parsing needs no database (`parse`); a prefix is resolved when the command has its
connection (`resolve`), with a range on the uuid primary key (the prefix padded
with 0s and with fs), never a scan. A command authorised by a macaroon resolves a
prefix against the session the macaroon names (`resolve_for_token`), so a prefix
tells someone without a macaroon nothing about which sessions exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from uuid import UUID

from towerctl.auth import macaroons
from towerctl.errors import BadInput, NotFound, Unauthorized

if TYPE_CHECKING:
    import psycopg

MIN_PREFIX = 8
MAX_COUNTED = 100  # an ambiguous prefix names how many sessions match, up to this many
_HEX = re.compile(r"^[0-9a-f]+$")

IN_RANGE = "SELECT id FROM sessions WHERE id >= %s AND id <= %s ORDER BY id LIMIT 2"
COUNT_IN_RANGE = """
SELECT count(*) FROM (SELECT 1 FROM sessions WHERE id >= %s AND id <= %s LIMIT %s) AS m"""


@dataclass(frozen=True)
class SessionRef:
    """A session id from the command line: `full` for a whole UUID, else a hex prefix."""

    prefix: str  # lower-case hex digits, no dashes
    full: UUID | None = None

    @property
    def lower(self) -> UUID:
        return UUID(self.prefix.ljust(32, "0"))

    @property
    def upper(self) -> UUID:
        return UUID(self.prefix.ljust(32, "f"))

    def __str__(self) -> str:
        return str(self.full) if self.full is not None else self.prefix


def parse(text: str) -> SessionRef:
    """A whole UUID, or 8 to 31 leading hex digits of one (dashes where a UUID has them)."""
    cleaned = text.strip().lower()
    try:
        whole = UUID(cleaned)
    except ValueError:
        pass
    else:
        return SessionRef(whole.hex, whole)
    digits = cleaned.replace("-", "")
    canonical = "-".join((digits[:8], digits[8:12], digits[12:16], digits[16:20], digits[20:32]))
    dashed_right = "-" not in cleaned or canonical.startswith(cleaned)
    if not _HEX.match(digits) or not dashed_right:
        raise BadInput("not a session id (a UUID, or 8 or more of its leading hex digits)")
    if len(digits) < MIN_PREFIX:
        raise BadInput(f"a session id prefix needs at least {MIN_PREFIX} hex digits")
    return SessionRef(digits)


def resolve(conn: psycopg.Connection, ref: SessionRef | UUID) -> UUID:
    """The session id a reference names: a whole UUID as it is (no query), a prefix when
    exactly one session's id starts with it (exit 4 for none, exit 2 for several)."""
    if isinstance(ref, UUID):
        return ref
    if ref.full is not None:
        return ref.full
    rows = conn.execute(IN_RANGE, (ref.lower, ref.upper)).fetchall()
    if not rows:
        raise NotFound(f"no session id starts with {ref.prefix}")
    if len(rows) > 1:
        count_row = conn.execute(COUNT_IN_RANGE, (ref.lower, ref.upper, MAX_COUNTED + 1))
        found = count_row.fetchone()
        count = int(found[0]) if found else 2
        shown = f"more than {MAX_COUNTED}" if count > MAX_COUNTED else str(count)
        raise BadInput(
            f"session id prefix {ref.prefix} is ambiguous: {shown} sessions match",
            hint="give more digits",
        )
    value = rows[0][0]
    return value if isinstance(value, UUID) else UUID(str(value))


def resolve_for_token(ref: SessionRef | UUID, token: str | None) -> UUID | None:
    """The session a macaroon names, when `ref` is a prefix of it; a whole id as it is.

    None when the token names no session or cannot be read (its check refuses it);
    a prefix of another session than the token's is refused (exit 3)."""
    if isinstance(ref, UUID):
        return ref
    if ref.full is not None:
        return ref.full
    try:
        named = macaroons.inspect(token).session_id if token else None
        claimed = UUID(named) if named else None
    except (macaroons.TokenRefused, ValueError):
        return None
    if claimed is None:
        return None
    if not claimed.hex.startswith(ref.prefix):
        raise Unauthorized("macaroon refused: it is for another session")
    return claimed
