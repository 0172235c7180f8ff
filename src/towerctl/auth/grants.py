"""Authorising a command with a macaroon: signature, revocation, expiry, session, scope."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from towerctl import config
from towerctl.auth import macaroons
from towerctl.auth.keys import KeyRing
from towerctl.errors import Unauthorized

if TYPE_CHECKING:
    import psycopg

IS_REVOKED = "SELECT 1 FROM macaroon_revocations WHERE identifier = %s"
REVOKE = """
INSERT INTO macaroon_revocations (identifier, session_id) VALUES (%s, %s)
ON CONFLICT (identifier) DO NOTHING"""


def authorize(
    conn: psycopg.Connection,
    ring: KeyRing,
    token: str | None,
    *,
    session_id: str | None = None,
    scope: str | None = None,
    now: datetime | None = None,
) -> macaroons.TokenInfo:
    """The token's facts when it authorises (session, scope); raises Unauthorized (exit 3)."""
    if not token or not token.strip():
        raise Unauthorized(
            "no macaroon given", hint="use --macaroon, --macaroon-file or TOWER_MACAROON"
        )
    try:
        info = macaroons.check_signature(ring, token, location=config.macaroon_location())
        if conn.execute(IS_REVOKED, (info.identifier,)).fetchone():
            raise macaroons.TokenRefused("revoked")
        macaroons.check_caveats(
            info, now=now or datetime.now(UTC), session_id=session_id, scope=scope
        )
    except macaroons.TokenRefused as refused:
        raise Unauthorized(f"macaroon refused: {refused}") from None
    return info


def revoke(conn: psycopg.Connection, ring: KeyRing, token: str) -> macaroons.TokenInfo:
    """Revoke an authentic token (and every token attenuated from it)."""
    try:
        info = macaroons.check_signature(ring, token, location=config.macaroon_location())
    except macaroons.TokenRefused as refused:
        raise Unauthorized(f"macaroon refused: {refused}") from None
    conn.execute(REVOKE, (info.identifier, info.session_id))
    return info
