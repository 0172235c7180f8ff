"""`towerctl context`: which database, home, migrations folder and root key are in use."""

from __future__ import annotations

import sys

import typer

from towerctl import context as facts
from towerctl.cli.params import JSON_OPTION
from towerctl.cli.state import print_json, state
from towerctl.sanitize import one_line


def context(ctx: typer.Context, as_json: bool = JSON_OPTION) -> None:
    """Say which database (no password), home, migrations and root key a command would use."""

    shared = state(ctx)
    found = facts.current(shared.database_url, shared.read_database_url)
    if as_json:
        print_json(found.as_json())
        return
    rows = [
        ("database", found.database),
        ("read database", found.read_database),
        ("home", found.home),
        ("migrations", found.migrations_dir),
        ("root key id", found.root_key_id),
    ]
    for name, setting in rows:
        if setting is None:
            continue
        value = "-" if setting.value is None else one_line(setting.value)
        sys.stdout.write(f"{name:<14} {value}  ({one_line(setting.source)})\n")
    if found.old_key_ids:
        sys.stdout.write(f"{'old key ids':<14} {', '.join(found.old_key_ids)}\n")
