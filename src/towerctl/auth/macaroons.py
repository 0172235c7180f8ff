"""Macaroons for one session: mint, inspect, attenuate, verify.

The only module that touches pymacaroons. Pure functions: caveats in, a token
or a verdict out. Tokens are macaroons in the standard version 2 binary format,
base64url without padding, so libmacaroons, go-macaroon and js-macaroon read
them. First-party caveats, each of which the verifier must understand:

    session = <uuid>              the session the token works on
    scope = read,request          what it may do (repeated caveats intersect)
    expires = 2026-11-27T07:00:00Z   (repeated caveats: the earliest wins)

The identifier is `towerctl1 key=<key id> nonce=<hex>`: printable, and naming
the root key that signed it so keys can rotate.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from towerctl.auth.keys import KeyRing
from towerctl.auth.keys import key_id as ring_key_id

SCOPES = ("read", "request")
DEFAULT_LOCATION = "timmy-tower"
IDENTIFIER = re.compile(r"^towerctl1 key=([0-9a-f]{12}) nonce=([0-9a-f]{32})\Z")
SESSION_CAVEAT = re.compile(
    r"^session = ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\Z"
)
SCOPE_CAVEAT = re.compile(r"^scope = ((?:read|request)(?:,(?:read|request))*)\Z")
EXPIRES_CAVEAT = re.compile(
    r"^expires = ([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)\Z"
)


class TokenRefused(Exception):
    """Why a token does not authorise; the message never contains the token."""


@dataclass(frozen=True)
class TokenInfo:
    location: str
    identifier: str
    key_id: str | None
    session_id: str | None
    scopes: tuple[str, ...]
    expires_at: datetime | None
    caveats: tuple[str, ...]


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def normalise_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    wanted = {s.strip() for s in scopes if s.strip()}
    unknown = wanted - set(SCOPES)
    if unknown or not wanted:
        raise ValueError(f"scopes must be among {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in wanted)


def _known(caveat: str) -> bool:
    if SESSION_CAVEAT.match(caveat) or SCOPE_CAVEAT.match(caveat):
        return True
    match = EXPIRES_CAVEAT.match(caveat)
    return bool(match and _parse_time(match.group(1)))


# --- decoding ----------------------------------------------------------------


def _decode(token: str) -> Any:
    """A pymacaroons Macaroon from canonical v2 base64url, or TokenRefused."""
    from pymacaroons import Macaroon
    from pymacaroons.macaroon import MACAROON_V2

    text = token.strip()
    if text.endswith("="):
        raise TokenRefused("malformed macaroon (padded: tokens are unpadded base64url)")
    if not text or len(text) > 16_384 or not re.fullmatch(r"[A-Za-z0-9_\-]+", text):
        raise TokenRefused("malformed macaroon")
    bare = text
    try:
        raw = base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError):
        raise TokenRefused("malformed macaroon") from None
    if base64.urlsafe_b64encode(raw).decode().rstrip("=") != bare:
        raise TokenRefused("malformed macaroon")  # non-canonical encoding: tampered
    if not raw or raw[0] != 2:
        raise TokenRefused("malformed macaroon (not the version 2 format)")
    try:
        macaroon = Macaroon.deserialize(bare)
        if macaroon.version != MACAROON_V2:
            raise ValueError("not v2")
        again = base64.urlsafe_b64decode(_serialize(macaroon) + "==")
        identifier = macaroon.identifier_bytes.decode("utf-8")
        for caveat in macaroon.caveats:
            caveat.caveat_id_bytes.decode("utf-8")
    except TokenRefused:
        raise
    except Exception:
        raise TokenRefused("malformed macaroon") from None
    # pymacaroons writes an empty location field where other libraries omit it.
    without_location = raw[1:2] != b"\x01" and again == raw[:1] + b"\x01\x00" + raw[1:]
    if again != raw and not without_location:
        raise TokenRefused("malformed macaroon (trailing or non-canonical data)")
    if not identifier.isprintable():
        raise TokenRefused("malformed macaroon (identifier is not printable text)")
    return macaroon


def _serialize(macaroon: Any) -> str:
    from pymacaroons.serializers import BinarySerializer

    text: str = macaroon.serialize(BinarySerializer())
    return text.rstrip("=")


def inspect(token: str) -> TokenInfo:
    """What a token says about itself; needs no key and shows no signature."""
    macaroon = _decode(token)
    identifier: str = macaroon.identifier_bytes.decode()
    caveats = tuple(c.caveat_id_bytes.decode() for c in macaroon.caveats)
    match = IDENTIFIER.match(identifier)
    sessions = {m.group(1) for c in caveats if (m := SESSION_CAVEAT.match(c))}
    scope_sets = [set(m.group(1).split(",")) for c in caveats if (m := SCOPE_CAVEAT.match(c))]
    scopes: set[str] = set(SCOPES)
    for s in scope_sets:
        scopes &= s
    expiries = [
        t for c in caveats if (m := EXPIRES_CAVEAT.match(c)) and (t := _parse_time(m.group(1)))
    ]
    location = macaroon.location
    return TokenInfo(
        location=location if isinstance(location, str) else "",
        identifier=identifier,
        key_id=match.group(1) if match else None,
        session_id=sessions.pop() if len(sessions) == 1 else None,
        scopes=tuple(s for s in SCOPES if s in scopes) if scope_sets else (),
        expires_at=min(expiries) if expiries else None,
        caveats=caveats,
    )


# --- minting and attenuating ---------------------------------------------------


def mint(
    ring: KeyRing,
    session_id: UUID,
    scopes: Iterable[str],
    expires_at: datetime,
    *,
    location: str = DEFAULT_LOCATION,
) -> str:
    from pymacaroons import Macaroon
    from pymacaroons.macaroon import MACAROON_V2

    identifier = f"towerctl1 key={ring.current_id} nonce={secrets.token_hex(16)}"
    macaroon = Macaroon(
        location=location, identifier=identifier, key=ring.current, version=MACAROON_V2
    )
    macaroon.add_first_party_caveat(f"session = {session_id}")
    macaroon.add_first_party_caveat(f"scope = {','.join(normalise_scopes(scopes))}")
    macaroon.add_first_party_caveat(f"expires = {_format_time(expires_at)}")
    return _serialize(macaroon)


def attenuate(
    token: str, *, scopes: Iterable[str] | None = None, expires_at: datetime | None = None
) -> str:
    """Add narrowing caveats; needs no root key. Raises ValueError when asked to widen."""
    macaroon = _decode(token)
    info = inspect(token)
    if scopes is not None:
        wanted = normalise_scopes(scopes)
        if info.scopes and not set(wanted) <= set(info.scopes):
            raise ValueError(f"cannot widen scopes {','.join(info.scopes)} to {','.join(wanted)}")
        macaroon.add_first_party_caveat(f"scope = {','.join(wanted)}")
    if expires_at is not None:
        if info.expires_at is not None and expires_at > info.expires_at:
            raise ValueError("cannot extend the expiry; the token already expires earlier")
        macaroon.add_first_party_caveat(f"expires = {_format_time(expires_at)}")
    return _serialize(macaroon)


# --- verifying -------------------------------------------------------------------


def check_signature(ring: KeyRing, token: str, *, location: str = DEFAULT_LOCATION) -> TokenInfo:
    """Authentic (signed by a key of the ring, every caveat understood)? Raises TokenRefused.

    The location is not covered by a macaroon's signature, so it must match exactly.
    """
    from pymacaroons import Verifier

    macaroon = _decode(token)
    info = inspect(token)
    if info.location != location:
        raise TokenRefused("issued for another location")
    if info.key_id is None:
        raise TokenRefused("not a towerctl macaroon (unknown identifier format)")
    key = ring.find(info.key_id)
    if key is None:
        known = ", ".join(ring_key_id(k) for k in ring.known())
        raise TokenRefused(
            f"signed with an unknown root key (key id {info.key_id}; this towerctl knows "
            f"{known}: point TOWER_ROOT_KEY_FILE at the key that minted it, or list it in "
            "TOWER_OLD_ROOT_KEYS_FILE)"
        )
    if any(caveat.third_party() for caveat in macaroon.caveats):
        # A caveat only another service can discharge: towerctl checks first-party
        # caveats alone and takes no discharge macaroons.
        raise TokenRefused(
            "carries a third-party caveat (towerctl accepts first-party caveats only)"
        )
    for caveat in info.caveats:
        if not _known(caveat):
            raise TokenRefused("carries a caveat towerctl does not understand")
    verifier = Verifier()
    verifier.satisfy_general(_known)
    try:
        ok = verifier.verify(macaroon, key)
    except Exception:
        ok = False
    if not ok:
        raise TokenRefused("invalid signature (tampered or signed with another key)")
    if info.session_id is None and any(SESSION_CAVEAT.match(c) for c in info.caveats):
        raise TokenRefused("names more than one session")
    if info.session_id is None or not any(SCOPE_CAVEAT.match(c) for c in info.caveats):
        raise TokenRefused("lacks a session or scope caveat")
    if info.expires_at is None:
        raise TokenRefused("lacks an expiry caveat")
    return info


def check_caveats(
    info: TokenInfo, *, now: datetime, session_id: str | None = None, scope: str | None = None
) -> None:
    """The request-dependent checks, on an already authentic token."""
    if info.expires_at is not None and now >= info.expires_at:
        raise TokenRefused(f"expired at {_format_time(info.expires_at)}")
    if session_id is not None and info.session_id != session_id:
        raise TokenRefused("issued for another session")
    if scope is not None and scope not in info.scopes:
        shown = ",".join(info.scopes) or "none"
        raise TokenRefused(f"lacks the '{scope}' scope (has {shown})")
