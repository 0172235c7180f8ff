"""Macaroon interoperability with implementations that are not built on pymacaroons.

Two independent implementations check towerctl's tokens, in both directions:

* a verifier and minter written here from the macaroon spec (libmacaroons'
  `doc/format.txt`, version 2 binary format), using only hmac and hashlib;
* js-macaroon 3.x (npm package `macaroon`, libmacaroons-compatible) run by node.
  It is installed with npm once per module; without node or npm these tests
  FAIL (CI has node), they never skip.

Each direction: a towerctl token verifies in the other implementation, a token
minted by the other implementation (towerctl identifier, towerctl caveats)
verifies in towerctl, and tampered tokens fail in both.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from conftest import CLI, ROOT_KEY_HEX
from towerctl.auth import macaroons
from towerctl.auth.keys import KeyRing, key_id
from towerctl.errors import ExitCode

KEY = bytes.fromhex(ROOT_KEY_HEX)
OTHER_KEY = bytes.fromhex("b2" * 32)
RING = KeyRing(current=KEY)
SESSION = UUID("5f0c3a52-1b7e-4d0e-9a43-8c2f6d1e7b90")
EXPIRES = datetime(2026, 11, 27, 7, 0, 0, tzinfo=UTC)
CAVEATS = (
    f"session = {SESSION}",
    "scope = read,request",
    "expires = 2026-11-27T07:00:00Z",
)
LOCATION = "timmy-tower"
IDENTIFIER = re.compile(r"^towerctl1 key=([0-9a-f]{12}) nonce=([0-9a-f]{32})$")
TOWER_REFUSES_SIGNATURE = "invalid signature"
NPM_TIMEOUT_SECONDS = 60


def towerctl_identifier(key: bytes = KEY) -> str:
    return f"towerctl1 key={key_id(key)} nonce={secrets.token_hex(16)}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- an independent implementation, from the spec -------------------------------------

KEY_GENERATOR = b"macaroons-key-generator"
FIELD_EOS = 0
FIELD_LOCATION = 1
FIELD_IDENTIFIER = 2
FIELD_VID = 4
FIELD_SIGNATURE = 6
VERSION_2 = 2


class SpecRefused(Exception):
    """The spec implementation rejects a token."""


@dataclass(frozen=True)
class SpecMacaroon:
    location: str
    identifier: bytes
    caveats: tuple[bytes, ...]
    signature: bytes

    @property
    def caveat_texts(self) -> tuple[str, ...]:
        return tuple(c.decode() for c in self.caveats)


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def spec_signature(root_key: bytes, identifier: bytes, caveats: Iterable[bytes]) -> bytes:
    """sig = HMAC(HMAC("macaroons-key-generator", root key), id), chained over caveats."""
    signature = _hmac(_hmac(KEY_GENERATOR, root_key), identifier)
    for caveat in caveats:
        signature = spec_add_caveat(signature, caveat)
    return signature


def spec_add_caveat(signature: bytes, caveat: bytes) -> bytes:
    """Attenuation needs only the previous signature, never the root key."""
    return _hmac(signature, caveat)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", text) or len(text) % 4 == 1:
        raise SpecRefused("not unpadded base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(kind: int, data: bytes) -> bytes:
    return _uvarint(kind) + _uvarint(len(data)) + data


def spec_encode(m: SpecMacaroon) -> bytes:
    out = bytearray([VERSION_2])
    if m.location:  # optional: omitted when empty
        out += _field(FIELD_LOCATION, m.location.encode())
    out += _field(FIELD_IDENTIFIER, m.identifier)
    out += _uvarint(FIELD_EOS)
    for caveat in m.caveats:  # first-party: identifier only
        out += _field(FIELD_IDENTIFIER, caveat)
        out += _uvarint(FIELD_EOS)
    out += _uvarint(FIELD_EOS)
    out += _field(FIELD_SIGNATURE, m.signature)
    return bytes(out)


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.at = 0

    def uvarint(self) -> int:
        value, shift = 0, 0
        while True:
            if self.at >= len(self.raw) or shift > 28:
                raise SpecRefused("bad varint")
            byte = self.raw[self.at]
            self.at += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    def field(self) -> tuple[int, bytes]:
        kind = self.uvarint()
        if kind == FIELD_EOS:
            return kind, b""
        length = self.uvarint()
        if self.at + length > len(self.raw):
            raise SpecRefused("field runs past the end")
        data = self.raw[self.at : self.at + length]
        self.at += length
        return kind, data

    def section(self) -> list[tuple[int, bytes]]:
        """Fields up to the next EOS, in strictly increasing type order."""
        fields: list[tuple[int, bytes]] = []
        while True:
            kind, data = self.field()
            if kind == FIELD_EOS:
                return fields
            if fields and kind <= fields[-1][0]:
                raise SpecRefused("fields out of order")
            fields.append((kind, data))


def spec_decode(raw: bytes) -> SpecMacaroon:
    if not raw or raw[0] != VERSION_2:
        raise SpecRefused("not version 2")
    reader = _Reader(raw)
    reader.at = 1
    header = dict(reader.section())
    if set(header) - {FIELD_LOCATION, FIELD_IDENTIFIER} or FIELD_IDENTIFIER not in header:
        raise SpecRefused("bad header section")
    caveats: list[bytes] = []
    while section := dict(reader.section()):
        if set(section) != {FIELD_IDENTIFIER}:
            raise SpecRefused("only first-party caveats are supported")
        caveats.append(section[FIELD_IDENTIFIER])
    kind, signature = reader.field()
    if kind != FIELD_SIGNATURE or len(signature) != 32:
        raise SpecRefused("bad signature field")
    if reader.at != len(raw):
        raise SpecRefused("trailing data")
    return SpecMacaroon(
        location=header.get(FIELD_LOCATION, b"").decode(),
        identifier=header[FIELD_IDENTIFIER],
        caveats=tuple(caveats),
        signature=signature,
    )


def spec_parse(token: str) -> SpecMacaroon:
    return spec_decode(unb64url(token))


def spec_token(m: SpecMacaroon) -> str:
    return b64url(spec_encode(m))


def spec_mint(
    root_key: bytes, identifier: str, caveats: Iterable[str], location: str = LOCATION
) -> str:
    ident = identifier.encode()
    cavs = tuple(c.encode() for c in caveats)
    return spec_token(SpecMacaroon(location, ident, cavs, spec_signature(root_key, ident, cavs)))


def spec_verify(token: str, root_key: bytes, accepted: Iterable[str]) -> SpecMacaroon:
    """Verify the signature; every caveat must be one of `accepted`."""
    m = spec_parse(token)
    allowed = set(accepted)
    for caveat in m.caveat_texts:
        if caveat not in allowed:
            raise SpecRefused(f"caveat not satisfied: {caveat}")
    if not hmac.compare_digest(spec_signature(root_key, m.identifier, m.caveats), m.signature):
        raise SpecRefused("signature mismatch")
    return m


# --- tampering: each keeps the token well-formed and its caveats understood --------------


def _swap_expiry(m: SpecMacaroon) -> SpecMacaroon:
    later = b"expires = 2099-01-01T00:00:00Z"
    swapped = tuple(later if c.startswith(b"expires = ") else c for c in m.caveats)
    assert swapped != m.caveats
    return dataclasses.replace(m, caveats=swapped)


def _drop_last_caveat(m: SpecMacaroon) -> SpecMacaroon:
    return dataclasses.replace(m, caveats=m.caveats[:-1])


def _append_unsigned_caveat(m: SpecMacaroon) -> SpecMacaroon:
    return dataclasses.replace(m, caveats=(*m.caveats, b"scope = read"))


def _flip_signature_bit(m: SpecMacaroon) -> SpecMacaroon:
    return dataclasses.replace(m, signature=bytes([m.signature[0] ^ 1]) + m.signature[1:])


def _other_nonce(m: SpecMacaroon) -> SpecMacaroon:
    return dataclasses.replace(m, identifier=towerctl_identifier(KEY).encode())


def _resign_with_other_key(m: SpecMacaroon) -> SpecMacaroon:
    """Identifier still names KEY, but the signature comes from another key."""
    return dataclasses.replace(m, signature=spec_signature(OTHER_KEY, m.identifier, m.caveats))


TAMPERS: dict[str, Callable[[SpecMacaroon], SpecMacaroon]] = {
    "expiry-extended": _swap_expiry,
    "caveat-dropped": _drop_last_caveat,
    "caveat-appended-unsigned": _append_unsigned_caveat,
    "signature-bit-flipped": _flip_signature_bit,
    "identifier-changed": _other_nonce,
    "signed-with-other-key": _resign_with_other_key,
}
TAMPER_NAMES = sorted(TAMPERS)


def tamper(token: str, name: str) -> str:
    tampered = spec_token(TAMPERS[name](spec_parse(token)))
    assert tampered != token
    return tampered


def towerctl_token() -> str:
    return macaroons.mint(RING, SESSION, macaroons.SCOPES, EXPIRES)


# --- js-macaroon under node ------------------------------------------------------------

NODE_SCRIPT = r"""
'use strict';
const macaroon = require('macaroon');
const request = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const bytes = (hex) => new Uint8Array(Buffer.from(hex, 'hex'));
const text = (b) => Buffer.from(b).toString('utf8');

function run(req) {
  if (req.op === 'verify') {
    const m = macaroon.importMacaroon(req.token);
    const accepted = new Set(req.caveats);
    const checked = [];
    m.verify(bytes(req.rootKeyHex), (condition) => {
      checked.push(condition);
      return accepted.has(condition) ? null : 'condition not accepted';
    });
    return {location: m.location, identifier: text(m.identifier), caveats: checked};
  }
  if (req.op === 'mint') {
    const m = macaroon.newMacaroon({
      rootKey: bytes(req.rootKeyHex),
      identifier: req.identifier,
      location: req.location,
      version: 2,
    });
    for (const c of req.caveats) {
      m.addFirstPartyCaveat(c);
    }
    return {token: macaroon.bytesToBase64(m.exportBinary())};
  }
  throw new Error('unknown op ' + req.op);
}

let reply;
try {
  reply = Object.assign({ok: true}, run(request));
} catch (e) {
  reply = {ok: false, error: String((e && e.message) || e)};
}
process.stdout.write(JSON.stringify(reply));
"""


@dataclass(frozen=True)
class JsMacaroon:
    node: str
    script: Path
    version: str

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        done = subprocess.run(
            [self.node, str(self.script)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"node failed: {done.stderr}"
        reply: dict[str, Any] = json.loads(done.stdout)
        return reply

    def verify(self, token: str, root_key: bytes, accepted: Iterable[str]) -> dict[str, Any]:
        """{"ok": true, location, identifier, caveats} or {"ok": false, error}."""
        return self._call(
            {"op": "verify", "token": token, "rootKeyHex": root_key.hex(), "caveats": [*accepted]}
        )

    def mint(
        self, root_key: bytes, identifier: str, caveats: Iterable[str], location: str = LOCATION
    ) -> str:
        reply = self._call(
            {
                "op": "mint",
                "rootKeyHex": root_key.hex(),
                "identifier": identifier,
                "location": location,
                "caveats": [*caveats],
            }
        )
        assert reply["ok"], reply
        token: str = reply["token"]
        return token


@pytest.fixture(scope="module")
def js(tmp_path_factory: pytest.TempPathFactory) -> JsMacaroon:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        pytest.fail(
            f"{missing} not found on PATH: the js-macaroon interoperability tests need "
            "Node.js with npm (CI has them; install nodejs and npm to run them locally)",
            pytrace=False,
        )
    folder = tmp_path_factory.mktemp("js-macaroon")
    try:
        done = subprocess.run(
            [npm, "install", "--prefix", str(folder), "macaroon@3", "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_SECONDS,
            check=False,
            env=os.environ | {"npm_config_update_notifier": "false"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"npm install macaroon@3 took longer than {NPM_TIMEOUT_SECONDS}s", pytrace=False
        )
    if done.returncode != 0:
        pytest.fail(
            f"npm install macaroon@3 failed (exit {done.returncode}):\n{done.stderr[-2000:]}",
            pytrace=False,
        )
    package = json.loads((folder / "node_modules" / "macaroon" / "package.json").read_text())
    script = folder / "interop.js"  # beside node_modules, so require('macaroon') finds it
    script.write_text(NODE_SCRIPT)
    return JsMacaroon(node, script, package["version"])


# --- the spec implementation itself ------------------------------------------------------


def test_spec_implementation_reproduces_libmacaroons_signatures() -> None:
    """Published libmacaroons vectors, so the reference is not checked only against itself."""
    key = b"this is our super secret key; only we should know it"
    ident = b"we used our secret key"
    assert spec_signature(key, ident, []).hex() == (
        "e3d9e02908526c4c0039ae15114115d97fdd68bf2ba379b342aaf0f617d0552f"
    )
    assert spec_signature(key, ident, [b"test = caveat"]).hex() == (
        "197bac7a044af33332865b9266e26d493bdd668a660e44d88ce1a998c23dbd67"
    )


def test_spec_varints_cover_multibyte_lengths() -> None:
    caveats = ("x" * 200, "y" * 20_000)
    token = spec_mint(KEY, towerctl_identifier(), caveats)
    assert spec_verify(token, KEY, caveats).caveat_texts == caveats
    assert _uvarint(300) == b"\xac\x02"


# --- towerctl -> spec ---------------------------------------------------------------------


def test_towerctl_token_verifies_with_spec_verifier() -> None:
    token = towerctl_token()
    m = spec_verify(token, KEY, CAVEATS)
    assert m.location == LOCATION
    match = IDENTIFIER.match(m.identifier.decode())
    assert match and match.group(1) == key_id(KEY)
    assert m.caveat_texts == CAVEATS
    assert spec_token(m) == token, "towerctl's encoding differs from the canonical v2 bytes"


def test_towerctl_tokens_have_fresh_nonces() -> None:
    first, second = spec_parse(towerctl_token()), spec_parse(towerctl_token())
    assert first.identifier != second.identifier
    assert first.signature != second.signature


def test_towerctl_attenuated_token_verifies_with_spec_verifier() -> None:
    earlier = EXPIRES - timedelta(hours=1)
    narrowed = macaroons.attenuate(towerctl_token(), scopes=["read"], expires_at=earlier)
    extra = ("scope = read", f"expires = {iso(earlier)}")
    m = spec_verify(narrowed, KEY, (*CAVEATS, *extra))
    assert m.caveat_texts == (*CAVEATS, *extra)


@pytest.mark.parametrize("name", TAMPER_NAMES)
def test_tampered_towerctl_token_fails_in_both(name: str) -> None:
    bad = tamper(towerctl_token(), name)
    with pytest.raises(SpecRefused, match="signature mismatch"):
        spec_verify(bad, KEY, (*CAVEATS, "scope = read", "expires = 2099-01-01T00:00:00Z"))
    with pytest.raises(macaroons.TokenRefused, match=TOWER_REFUSES_SIGNATURE):
        macaroons.check_signature(RING, bad)


def test_towerctl_token_fails_spec_verifier_with_another_key() -> None:
    with pytest.raises(SpecRefused, match="signature mismatch"):
        spec_verify(towerctl_token(), OTHER_KEY, CAVEATS)


# --- spec -> towerctl ---------------------------------------------------------------------


def towerctl_reads(token: str, ident: str, location: str | None = None) -> macaroons.TokenInfo:
    """towerctl accepts a token minted elsewhere (at `location`; towerctl's default when
    None) and reads from it what it was minted with."""
    if location is None:
        info = macaroons.check_signature(RING, token)
    else:
        info = macaroons.check_signature(RING, token, location=location)
    assert info.identifier == ident
    assert info.key_id == key_id(KEY)
    assert info.location == (LOCATION if location is None else location)
    assert info.session_id == str(SESSION)
    assert info.scopes == ("read", "request")
    assert info.expires_at == EXPIRES
    return info


@pytest.mark.parametrize("location", [LOCATION, "https://tower.example/v1"])
def test_spec_minted_token_passes_towerctl(location: str) -> None:
    ident = towerctl_identifier()
    info = towerctl_reads(spec_mint(KEY, ident, CAVEATS, location), ident, location)
    assert info.caveats == CAVEATS


def test_location_is_unsigned_so_towerctl_checks_it() -> None:
    """Relocating a token keeps it valid per the spec; towerctl must refuse it itself."""
    m = spec_parse(towerctl_token())
    moved = spec_token(dataclasses.replace(m, location="https://elsewhere.example/"))
    assert spec_verify(moved, KEY, CAVEATS).location == "https://elsewhere.example/"
    with pytest.raises(macaroons.TokenRefused, match="another location"):
        macaroons.check_signature(RING, moved)


def test_spec_minted_token_with_rotated_key_passes_towerctl() -> None:
    ring = KeyRing(current=OTHER_KEY, old=(KEY,))
    info = macaroons.check_signature(ring, spec_mint(KEY, towerctl_identifier(KEY), CAVEATS))
    assert info.key_id == key_id(KEY)


def test_spec_attenuation_of_towerctl_token_passes_towerctl() -> None:
    """Add a caveat with nothing but the token's signature, as any holder may."""
    m = spec_parse(towerctl_token())
    caveat = b"scope = read"
    narrowed = dataclasses.replace(
        m, caveats=(*m.caveats, caveat), signature=spec_add_caveat(m.signature, caveat)
    )
    info = macaroons.check_signature(RING, spec_token(narrowed))
    assert info.scopes == ("read",)
    assert info.caveats == (*CAVEATS, "scope = read")


@pytest.mark.parametrize("name", TAMPER_NAMES)
def test_tampered_spec_token_fails_in_both(name: str) -> None:
    bad = tamper(spec_mint(KEY, towerctl_identifier(), CAVEATS), name)
    with pytest.raises(macaroons.TokenRefused, match=TOWER_REFUSES_SIGNATURE):
        macaroons.check_signature(RING, bad)
    with pytest.raises(SpecRefused, match="signature mismatch"):
        spec_verify(bad, KEY, (*CAVEATS, "scope = read", "expires = 2099-01-01T00:00:00Z"))


def test_spec_minted_token_with_unknown_caveat_is_refused() -> None:
    token = spec_mint(KEY, towerctl_identifier(), (*CAVEATS, "ip = 10.0.0.1"))
    spec_verify(token, KEY, (*CAVEATS, "ip = 10.0.0.1"))  # authentic...
    with pytest.raises(macaroons.TokenRefused, match="does not understand"):
        macaroons.check_signature(RING, token)  # ...but towerctl must not ignore a caveat


def test_spec_minted_token_without_location_is_readable_by_towerctl() -> None:
    token = spec_mint(KEY, towerctl_identifier(), CAVEATS, location="")
    assert spec_verify(token, KEY, CAVEATS).location == ""
    assert macaroons.inspect(token).caveats == CAVEATS
    info = macaroons.check_signature(RING, token, location="")
    assert info.session_id == str(SESSION)


def test_caveat_with_trailing_newline_is_not_understood() -> None:
    token = spec_mint(KEY, towerctl_identifier(), (*CAVEATS, "scope = read\n"))
    with pytest.raises(macaroons.TokenRefused, match="does not understand"):
        macaroons.check_signature(RING, token)


# --- towerctl <-> js-macaroon -------------------------------------------------------------


def test_js_macaroon_is_version_3(js: JsMacaroon) -> None:
    assert js.version.startswith("3."), js.version


def test_towerctl_token_verifies_with_js_macaroon(js: JsMacaroon) -> None:
    token = towerctl_token()
    reply = js.verify(token, KEY, CAVEATS)
    assert reply["ok"], reply
    assert reply["location"] == LOCATION
    assert reply["identifier"] == spec_parse(token).identifier.decode()
    assert tuple(reply["caveats"]) == CAVEATS


def test_js_macaroon_consults_the_caveat_check(js: JsMacaroon) -> None:
    reply = js.verify(towerctl_token(), KEY, CAVEATS[:-1])
    assert not reply["ok"]
    assert "caveat check failed" in reply["error"]


def test_towerctl_token_fails_js_macaroon_with_another_key(js: JsMacaroon) -> None:
    reply = js.verify(towerctl_token(), OTHER_KEY, CAVEATS)
    assert not reply["ok"]
    assert "signature mismatch" in reply["error"]


def test_towerctl_attenuated_token_verifies_with_js_macaroon(js: JsMacaroon) -> None:
    earlier = EXPIRES - timedelta(minutes=30)
    narrowed = macaroons.attenuate(towerctl_token(), scopes=["request"], expires_at=earlier)
    extra = ("scope = request", f"expires = {iso(earlier)}")
    reply = js.verify(narrowed, KEY, (*CAVEATS, *extra))
    assert reply["ok"], reply
    assert tuple(reply["caveats"]) == (*CAVEATS, *extra)


@pytest.mark.parametrize("name", TAMPER_NAMES)
def test_tampered_towerctl_token_fails_js_macaroon(js: JsMacaroon, name: str) -> None:
    bad = tamper(towerctl_token(), name)
    reply = js.verify(bad, KEY, (*CAVEATS, "scope = read", "expires = 2099-01-01T00:00:00Z"))
    assert not reply["ok"]
    assert "signature mismatch" in reply["error"]


def test_js_minted_token_passes_towerctl(js: JsMacaroon) -> None:
    ident = towerctl_identifier()
    towerctl_reads(js.mint(KEY, ident, CAVEATS), ident)


def test_three_implementations_encode_identical_bytes(js: JsMacaroon) -> None:
    """Same key, identifier, location and caveats: towerctl, spec and js give one token."""
    token = towerctl_token()
    m = spec_parse(token)
    ident = m.identifier.decode()
    assert spec_mint(KEY, ident, m.caveat_texts, m.location) == token
    assert js.mint(KEY, ident, m.caveat_texts, m.location) == token


@pytest.mark.parametrize("name", TAMPER_NAMES)
def test_tampered_js_token_fails_in_both(js: JsMacaroon, name: str) -> None:
    bad = tamper(js.mint(KEY, towerctl_identifier(), CAVEATS), name)
    with pytest.raises(macaroons.TokenRefused, match=TOWER_REFUSES_SIGNATURE):
        macaroons.check_signature(RING, bad)
    reply = js.verify(bad, KEY, (*CAVEATS, "scope = read", "expires = 2099-01-01T00:00:00Z"))
    assert not reply["ok"]
    assert "signature mismatch" in reply["error"]


# --- the CLI ------------------------------------------------------------------------------


def open_session(cli: CLI) -> tuple[str, str]:
    """(session id, its macaroon) from `towerctl session open`."""
    opened = cli("session", "open", "--deposit", "100", "--json")
    assert opened.exit_code == ExitCode.OK, opened.stderr
    doc = json.loads(opened.stdout)
    return doc["sessionId"], doc["macaroon"]


def test_cli_verifies_js_minted_token(cli: CLI, js: JsMacaroon) -> None:
    sid, _ = open_session(cli)
    expires = iso(datetime.now(UTC) + timedelta(hours=1))
    caveats = (f"session = {sid}", "scope = read,request", f"expires = {expires}")
    token = js.mint(KEY, towerctl_identifier(), caveats)

    good = cli("macaroon", "verify", token, "--session", sid)
    assert good.exit_code == ExitCode.OK, good.stderr
    assert good.stdout.startswith(f"valid: session {sid}, scopes read,request, expires ")

    # One caveat changed (scope narrowed), the signature kept: forged.
    m = spec_parse(token)
    changed = tuple(b"scope = read" if c.startswith(b"scope = ") else c for c in m.caveats)
    forged = spec_token(dataclasses.replace(m, caveats=changed))
    bad = cli("macaroon", "verify", forged, "--session", sid)
    assert bad.exit_code == ExitCode.UNAUTHORIZED
    assert TOWER_REFUSES_SIGNATURE in bad.stderr
    assert bad.stdout == ""


def test_cli_refuses_authentic_js_token_for_another_session(cli: CLI, js: JsMacaroon) -> None:
    sid, _ = open_session(cli)
    expires = iso(datetime.now(UTC) + timedelta(hours=1))
    caveats = (f"session = {uuid4()}", "scope = read,request", f"expires = {expires}")
    token = js.mint(KEY, towerctl_identifier(), caveats)
    assert js.verify(token, KEY, caveats)["ok"]
    result = cli("macaroon", "verify", token, "--session", sid)
    assert result.exit_code == ExitCode.UNAUTHORIZED
    assert "another session" in result.stderr


def test_cli_session_macaroon_verifies_with_js_and_spec(cli: CLI, js: JsMacaroon) -> None:
    sid, token = open_session(cli)
    m = spec_parse(token)
    session, scope, expires = m.caveat_texts
    assert (session, scope) == (f"session = {sid}", "scope = read,request")
    stamp = datetime.strptime(expires, "expires = %Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(stamp - (datetime.now(UTC) + timedelta(hours=24))) < timedelta(minutes=5)

    assert spec_verify(token, KEY, m.caveat_texts) == m
    reply = js.verify(token, KEY, m.caveat_texts)
    assert reply["ok"], reply
    assert tuple(reply["caveats"]) == m.caveat_texts
