"""Macaroons: every way a token can be wrong is refused with exit 3."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymacaroons import Macaroon

from conftest import CLI, ROOT_KEY_HEX, OpenedSession, open_session
from towerctl.auth import macaroons
from towerctl.auth.keys import KeyRing
from towerctl.errors import ExitCode

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def verify(cli: CLI, token: str, *extra: str) -> int:
    result = cli("macaroon", "verify", token, *extra)
    if result.exit_code != 0:
        assert token not in result.stderr, "a refusal must not echo the token"
        assert len(result.stderr.strip().splitlines()) == 1
    return result.exit_code


def add_caveat(token: str, caveat: str) -> str:
    """What a holder can do without the key: append a first-party caveat."""
    m = Macaroon.deserialize(token)
    m.add_first_party_caveat(caveat)
    return str(m.serialize()).rstrip("=")


@pytest.fixture
def session(cli: CLI) -> OpenedSession:
    return open_session(cli)


def test_valid_token_verifies_for_its_session_and_scopes(cli: CLI, session: OpenedSession) -> None:
    assert verify(cli, session.macaroon) == ExitCode.OK
    assert verify(cli, session.macaroon, "--session", session.id, "--scope", "read") == 0
    assert verify(cli, session.macaroon, "--scope", "request") == ExitCode.OK


def test_every_single_character_change_is_refused(cli: CLI, session: OpenedSession) -> None:
    token = session.macaroon
    accepted = []
    for i, ch in enumerate(token):
        other = B64[(B64.index(ch) + 1) % 64]
        if verify(cli, token[:i] + other + token[i + 1 :]) != ExitCode.UNAUTHORIZED:
            accepted.append(i)
    assert accepted == []


def test_truncated_and_garbage_tokens(cli: CLI, session: OpenedSession) -> None:
    token = session.macaroon
    for bad in (
        token[:-1],
        token[:-10],
        token[: len(token) // 2],
        "garbage",
        "@@@",
        "=",
        "a" * 300,
    ):
        assert verify(cli, bad) == ExitCode.UNAUTHORIZED, bad


def test_wrong_session_and_wrong_scope(cli: CLI, session: OpenedSession) -> None:
    other = open_session(cli)
    assert verify(cli, session.macaroon, "--session", other.id) == ExitCode.UNAUTHORIZED
    read_only = cli("macaroon", "mint", session.id, "--scope", "read").stdout.strip()
    assert verify(cli, read_only, "--scope", "read") == ExitCode.OK
    assert verify(cli, read_only, "--scope", "request") == ExitCode.UNAUTHORIZED


def test_expired_token(cli: CLI, session: OpenedSession) -> None:
    ring = KeyRing(bytes.fromhex(ROOT_KEY_HEX))
    past = datetime.now(UTC) - timedelta(seconds=1)
    token = macaroons.mint(ring, UUID(session.id), ["read"], past)
    result = cli("macaroon", "verify", token)
    assert result.exit_code == ExitCode.UNAUTHORIZED
    assert "expired" in result.stderr


def test_revoked_token_and_its_attenuations(cli: CLI, session: OpenedSession) -> None:
    narrowed = cli("macaroon", "attenuate", session.macaroon, "--scope", "read").stdout.strip()
    assert verify(cli, narrowed) == ExitCode.OK
    assert cli("macaroon", "revoke", session.macaroon).exit_code == ExitCode.OK
    assert verify(cli, session.macaroon) == ExitCode.UNAUTHORIZED
    assert "revoked" in cli("macaroon", "verify", narrowed).stderr
    # Attenuating a revoked token does not escape the revocation.
    again = cli("macaroon", "attenuate", session.macaroon, "--ttl", "1h").stdout.strip()
    assert verify(cli, again) == ExitCode.UNAUTHORIZED
    # Another token of the same session is unaffected.
    fresh = cli("macaroon", "mint", session.id).stdout.strip()
    assert verify(cli, fresh) == ExitCode.OK


def test_token_signed_with_another_key(cli: CLI, session: OpenedSession) -> None:
    ring = KeyRing(bytes.fromhex("b2" * 32))
    token = macaroons.mint(ring, UUID(session.id), ["read"], datetime.now(UTC) + timedelta(hours=1))
    result = cli("macaroon", "verify", token)
    assert result.exit_code == ExitCode.UNAUTHORIZED
    assert "unknown root key" in result.stderr


def test_forged_key_id_with_another_key(cli: CLI, session: OpenedSession) -> None:
    """A token claiming our key id but signed with another key fails on the signature."""
    good = macaroons.inspect(session.macaroon)
    m = Macaroon(location="timmy-tower", identifier=good.identifier, key=b"x" * 32, version=2)
    for caveat in good.caveats:
        m.add_first_party_caveat(caveat)
    result = cli("macaroon", "verify", m.serialize().rstrip("="))
    assert result.exit_code == ExitCode.UNAUTHORIZED
    assert "signature" in result.stderr


def test_attenuated_to_read_cannot_be_widened_back(cli: CLI, session: OpenedSession) -> None:
    read_only = cli("macaroon", "attenuate", session.macaroon, "--scope", "read").stdout.strip()
    assert json.loads(cli("macaroon", "inspect", read_only, "--json").stdout)["scopes"] == ["read"]
    refused = cli("macaroon", "attenuate", read_only, "--scope", "read,request")
    assert refused.exit_code == ExitCode.BAD_INPUT
    widened = add_caveat(read_only, "scope = read,request")
    assert verify(cli, widened, "--scope", "read") == ExitCode.OK
    assert verify(cli, widened, "--scope", "request") == ExitCode.UNAUTHORIZED
    later = add_caveat(read_only, "expires = 2099-01-01T00:00:00Z")
    info = json.loads(cli("macaroon", "inspect", later, "--json").stdout)
    assert info["expiresAt"] < "2099"


def test_attenuated_ttl_is_earlier(cli: CLI, session: OpenedSession) -> None:
    short = cli("macaroon", "attenuate", session.macaroon, "--ttl", "90s").stdout.strip()
    expires = json.loads(cli("macaroon", "inspect", short, "--json").stdout)["expiresAt"]
    moment = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    assert moment - datetime.now(UTC) < timedelta(seconds=95)
    assert verify(cli, short) == ExitCode.OK


@pytest.mark.parametrize(
    "caveat",
    [
        "admin = true",
        "time < 2099-01-01T00:00:00Z",
        "scope = read,admin",
        "session = *",
        "scope=read",
    ],
)
def test_unknown_caveat_added_by_holder_fails_closed(
    cli: CLI, session: OpenedSession, caveat: str
) -> None:
    assert verify(cli, add_caveat(session.macaroon, caveat)) == ExitCode.UNAUTHORIZED


def test_second_session_caveat_makes_token_useless(cli: CLI, session: OpenedSession) -> None:
    other = open_session(cli)
    both = add_caveat(session.macaroon, f"session = {other.id}")
    assert verify(cli, both, "--session", session.id) == ExitCode.UNAUTHORIZED
    assert verify(cli, both, "--session", other.id) == ExitCode.UNAUTHORIZED


def test_inspect_needs_no_key_and_shows_no_signature(
    cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOWER_ROOT_KEY")
    monkeypatch.setenv("TOWER_ROOT_KEY_FILE", "/nonexistent/key")
    result = cli("macaroon", "inspect", session.macaroon, "--json")
    assert result.exit_code == ExitCode.OK
    doc = json.loads(result.stdout)
    assert set(doc) == {
        "location",
        "identifier",
        "keyId",
        "sessionId",
        "scopes",
        "expiresAt",
        "caveats",
    }
    assert doc["identifier"].startswith("towerctl1 key=")
    assert doc["keyId"] in doc["identifier"]
    signature = Macaroon.deserialize(session.macaroon).signature
    assert signature not in result.stdout
    plain = cli("macaroon", "inspect", session.macaroon)
    assert signature not in plain.stdout and doc["identifier"] in plain.stdout


def test_token_from_stdin(cli: CLI, session: OpenedSession) -> None:
    result = cli("macaroon", "verify", "-", input=session.macaroon + "\n")
    assert result.exit_code == ExitCode.OK


def test_key_rotation(cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch) -> None:
    new_key = "c3" * 32
    monkeypatch.setenv("TOWER_ROOT_KEY", new_key)
    assert verify(cli, session.macaroon) == ExitCode.UNAUTHORIZED
    monkeypatch.setenv("TOWER_OLD_ROOT_KEYS", ROOT_KEY_HEX)
    assert verify(cli, session.macaroon) == ExitCode.OK
    fresh = cli("macaroon", "mint", session.id).stdout.strip()
    assert macaroons.inspect(fresh).key_id != macaroons.inspect(session.macaroon).key_id
    monkeypatch.delenv("TOWER_OLD_ROOT_KEYS")
    assert verify(cli, fresh) == ExitCode.OK


def test_root_key_file_is_created_0600_and_reused(
    cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOWER_ROOT_KEY")
    home = Path(os.environ["TOWER_HOME"])
    token = cli("macaroon", "mint", session.id).stdout.strip()
    key_file = home / "root.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key_file.read_text().strip())) == 32
    assert verify(cli, token) == ExitCode.OK
    key_file.chmod(0o644)
    refused = cli("macaroon", "verify", token)
    assert refused.exit_code == ExitCode.BAD_INPUT
    assert "chmod 600" in refused.stderr
    assert key_file.read_text().strip() not in refused.stderr


@pytest.mark.parametrize("key", ["ab" * 31, "not hex at all", "abc"])
def test_bad_root_keys_are_refused_without_echo(
    cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("TOWER_ROOT_KEY", key)
    result = cli("macaroon", "mint", session.id)
    assert result.exit_code == ExitCode.BAD_INPUT
    assert key not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--scope", "admin"],
        ["--scope", ""],
        ["--ttl", "0s"],
        ["--ttl", "forever"],
        ["--ttl", "400d"],
        ["--ttl", "-5m"],
    ],
)
def test_bad_mint_flags_exit_2(cli: CLI, session: OpenedSession, args: list[str]) -> None:
    result = cli("macaroon", "mint", session.id, *args)
    assert result.exit_code == ExitCode.BAD_INPUT, result.stderr
    assert result.stdout == ""


def test_missing_token_is_unauthorized(cli: CLI) -> None:
    assert cli("macaroon", "verify", "").exit_code == ExitCode.UNAUTHORIZED
    assert cli("macaroon", "inspect", "-", input="").exit_code == ExitCode.UNAUTHORIZED


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(st.text(max_size=400), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_text_tokens_always_exit_3(cli: CLI, token: str) -> None:
    if token in ("-", "") or token.startswith("-"):
        token = "x" + token
    for command in ("verify", "inspect", "revoke"):
        result = cli("macaroon", command, token)
        assert result.exit_code == ExitCode.UNAUTHORIZED, (command, result.stderr)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=1, max_size=200))
def test_arbitrary_v2_looking_bytes_exit_3(cli: CLI, payload: bytes) -> None:
    import base64

    token = base64.urlsafe_b64encode(b"\x02" + payload).decode().rstrip("=")
    assert cli("macaroon", "verify", token).exit_code == ExitCode.UNAUTHORIZED


def test_empty_token_argument_never_uses_the_environment(
    cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOWER_MACAROON", session.macaroon)
    for command in ("revoke", "verify", "inspect"):
        assert cli("macaroon", command, "").exit_code == ExitCode.UNAUTHORIZED
    assert verify(cli, session.macaroon) == ExitCode.OK, "the env token must not be revoked"


@pytest.mark.parametrize("key", ["a1" * 16 + "\n" + "a1" * 16, "a1 " * 32])
def test_root_key_with_whitespace_inside_is_refused(
    cli: CLI, session: OpenedSession, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv("TOWER_ROOT_KEY", key)
    assert cli("macaroon", "mint", session.id).exit_code == ExitCode.BAD_INPUT


def test_verify_json_says_what_the_token_allows(cli: CLI, session: OpenedSession) -> None:
    done = cli("macaroon", "verify", session.macaroon, "--json")
    assert done.exit_code == ExitCode.OK, done.stderr
    doc = json.loads(done.stdout)
    assert doc["valid"] is True and doc["sessionId"] == session.id
    assert doc["scopes"] == ["read", "request"] and doc["expiresAt"].endswith("Z")
    refused = cli("macaroon", "verify", session.macaroon + "x", "--json")
    assert refused.exit_code == ExitCode.UNAUTHORIZED
    assert json.loads(refused.stdout)["error"]["exitCode"] == ExitCode.UNAUTHORIZED


def test_third_party_caveat_is_named_as_such(cli: CLI, session: OpenedSession) -> None:
    """A caveat for another service to discharge is refused for what it is, not as a
    forgery; even one whose id reads like a caveat towerctl knows."""
    m = Macaroon.deserialize(session.macaroon)
    m.add_third_party_caveat("https://auth.example", "k" * 32, "scope = read")
    token = str(m.serialize()).rstrip("=")
    result = cli("macaroon", "verify", token)
    assert result.exit_code == ExitCode.UNAUTHORIZED
    assert "third-party caveat" in result.stderr
    assert "signature" not in result.stderr
    assert token not in result.stderr
