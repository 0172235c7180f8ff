"""`towerctl macaroon`: mint, inspect, verify, attenuate and revoke session tokens.

A TOKEN argument of `-` reads the token from stdin.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import typer

from towerctl import auth, config, sessions
from towerctl.auth import keys, macaroons
from towerctl.cli.params import (
    JSON_OPTION,
    duration_option,
    session_id_argument,
    session_id_option,
)
from towerctl.cli.state import connect, note, print_json, read_token
from towerctl.errors import BadInput, Unauthorized
from towerctl.render import iso, write_key_values
from towerctl.sanitize import one_line
from towerctl.session_ids import SessionRef
from towerctl.sessions import resolve_id

app = typer.Typer(help="Macaroons that authorise work on one session.", no_args_is_help=True)

TOKEN = typer.Argument(..., metavar="TOKEN", help="The macaroon, or - to read it from stdin.")


def _token(value: str) -> str:
    """The TOKEN argument, or stdin for `-`. Never the environment: an empty argument
    (say, an unset shell variable) must not act on TOWER_MACAROON's token."""

    token = (read_token("-") or "") if value == "-" else value.strip()
    if not token:
        raise Unauthorized("no macaroon given")
    return token


def _scopes(text: str) -> tuple[str, ...]:
    try:
        return macaroons.normalise_scopes(text.split(","))
    except ValueError as error:
        raise BadInput(f"--scope: {error}") from None


@app.command("mint")
def mint(
    ctx: typer.Context,
    session_id: SessionRef = session_id_argument("SESSION_ID"),
    scope: str = typer.Option("read,request", "--scope", help="Comma-separated: read, request."),
    lifetime: timedelta = duration_option("24h", "--ttl", "Lifetime: 90s, 15m, 24h, 7d."),
) -> None:
    """Mint a macaroon for one session; prints the token alone."""

    scopes = _scopes(scope)
    ring = keys.load_ring(create=True)
    session = sessions.get_session(connect(ctx), session_id)
    token = macaroons.mint(
        ring,
        session.id,
        scopes,
        datetime.now(UTC) + lifetime,
        location=config.macaroon_location(),
    )
    sys.stdout.write(token + "\n")


@app.command("inspect")
def inspect(token: str = TOKEN, as_json: bool = JSON_OPTION) -> None:
    """Show what a token says (no key needed; the signature is never shown)."""

    try:
        info = macaroons.inspect(_token(token))
    except macaroons.TokenRefused as refused:
        raise Unauthorized(f"macaroon refused: {refused}") from None
    doc = {
        "location": info.location,
        "identifier": info.identifier,
        "keyId": info.key_id,
        "sessionId": info.session_id,
        "scopes": list(info.scopes),
        "expiresAt": info.expires_at,
        "caveats": list(info.caveats),
    }
    if as_json:
        print_json(doc)
        return
    # A token of unknown origin: every field it carries is shown visibly, one line each.

    shown = doc | {
        "location": one_line(info.location),
        "identifier": one_line(info.identifier),
        "scopes": ",".join(info.scopes),
        "caveats": "",
    }
    write_key_values(shown, sys.stdout)
    for caveat in info.caveats:
        sys.stdout.write(f"  {one_line(caveat)}\n")


@app.command("verify")
def verify(
    ctx: typer.Context,
    token: str = TOKEN,
    session: SessionRef | None = session_id_option("--session", "Require this session."),
    scope: str | None = typer.Option(None, "--scope", help="Require this scope."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Check a token: signature, caveats, expiry, revocation (exit 3 when it fails)."""

    conn = connect(ctx)
    sid = str(resolve_id(conn, session)) if session else None
    required = None
    if scope is not None:
        wanted = _scopes(scope)
        if len(wanted) != 1:
            raise BadInput("--scope takes one scope to require: read or request")
        required = wanted[0]
    info = auth.authorize(conn, keys.load_ring(), _token(token), session_id=sid, scope=required)
    if as_json:
        print_json(
            {
                "valid": True,
                "sessionId": info.session_id,
                "scopes": list(info.scopes),
                "expiresAt": info.expires_at,
                "keyId": info.key_id,
            }
        )
        return
    sys.stdout.write(
        f"valid: session {info.session_id}, scopes {','.join(info.scopes)}, "
        f"expires {iso(info.expires_at)}\n"
    )


@app.command("attenuate")
def attenuate(
    token: str = TOKEN,
    scope: str | None = typer.Option(None, "--scope", help="Narrow to these scopes."),
    ttl: timedelta | None = duration_option(None, "--ttl", "Expire sooner: 90s, 15m, 24h, 7d."),
) -> None:
    """Add narrowing caveats (no root key needed); prints the new token alone."""

    scopes = _scopes(scope) if scope else None
    expires = datetime.now(UTC) + ttl if ttl else None
    if scopes is None and expires is None:
        raise BadInput("give --scope and/or --ttl to narrow the token")
    try:
        narrowed = macaroons.attenuate(_token(token), scopes=scopes, expires_at=expires)
    except macaroons.TokenRefused as refused:
        raise Unauthorized(f"macaroon refused: {refused}") from None
    except ValueError as error:
        raise BadInput(str(error)) from None
    sys.stdout.write(narrowed + "\n")


@app.command("revoke")
def revoke(ctx: typer.Context, token: str = TOKEN) -> None:
    """Revoke a token, and every token attenuated from it, from now on."""

    info = auth.revoke(connect(ctx), keys.load_ring(), _token(token))
    note(f"revoked macaroon {info.identifier!r} (session {info.session_id})")
