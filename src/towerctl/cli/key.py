"""`towerctl key`: the root key that mints macaroons (its id, and rotation)."""

from __future__ import annotations

import sys

import typer

from towerctl.auth import keys
from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import note, print_json

app = typer.Typer(help="The root key that mints macaroons: show its id, rotate it.",
                  no_args_is_help=True)  # fmt: skip


@app.command("show")
def show(as_json: bool = JSON_OPTION) -> None:
    """Print the current root key's id (never the key) and where it comes from."""

    kid = keys.current_key_id()
    old = [keys.key_id(k) for k in keys.old_keys()]
    if as_json:
        print_json({"keyId": kid, "source": keys.key_source(), "oldKeyIds": old})
        return
    sys.stdout.write(kid + "\n")
    note(f"from {keys.key_source()}" + (f"; old keys still verifying: {', '.join(old)}"
                                        if old else ""))  # fmt: skip


@app.command("rotate")
def rotate(as_json: bool = JSON_OPTION) -> None:
    """Make a new current key in TOWER_HOME; the old one keeps verifying its tokens."""

    old, new = keys.rotate()
    if as_json:
        print_json({"keyId": new, "previousKeyId": old})
        return
    sys.stdout.write(new + "\n")
    note(f"rotated the root key: {old} -> {new} ({old} kept in {keys.old_keys_path()})")
