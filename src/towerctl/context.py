"""Which database, home, migrations folder and root key a command would use, and where
each choice comes from (`towerctl context`). Reads settings only: starts no server,
creates no key, connects to nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from towerctl import config, embedded
from towerctl.auth import keys
from towerctl.db import safe_url
from towerctl.errors import TowerError
from towerctl.migrations.files import default_dir


@dataclass(frozen=True)
class Setting:
    value: str | None  # None: not set, or not known without starting something
    source: str  # a flag, a variable, or what the default is


@dataclass(frozen=True)
class Context:
    database: Setting
    read_database: Setting | None
    home: Setting
    migrations_dir: Setting
    root_key_id: Setting
    old_key_ids: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        def doc(s: Setting | None) -> dict[str, str | None] | None:
            return None if s is None else {"value": s.value, "source": s.source}

        return {
            "database": doc(self.database),
            "readDatabase": doc(self.read_database),
            "home": doc(self.home),
            "migrationsDir": doc(self.migrations_dir),
            "rootKeyId": doc(self.root_key_id),
            "oldKeyIds": list(self.old_key_ids),
        }


def configured_database(flag: str | None) -> Setting | None:
    """The database another setting names (never the embedded one), or None."""

    if flag:
        return Setting(safe_url(flag), "--database-url")
    if os.environ.get("TOWER_DATABASE_URL"):
        return Setting(safe_url(os.environ["TOWER_DATABASE_URL"]), "TOWER_DATABASE_URL")
    return None


def current(database_flag: str | None, read_flag: str | None) -> Context:
    home = config.home()
    database = configured_database(database_flag)
    if database is None:
        running = embedded.read_running(embedded.pgdata_path(home))
        database = Setting(
            running.url if running else None,
            "embedded server" + ("" if running else " (stopped: starts on first use)"),
        )
    read_url = config.read_database_url(read_flag)
    read_source = "--read-database-url" if read_flag else "TOWER_READ_DATABASE_URL"
    explicit_dir = os.environ.get("TOWER_MIGRATIONS_DIR")
    try:
        key = Setting(keys.key_id(keys.current_key()), keys.key_source())
    except TowerError as problem:
        key = Setting(None, f"{keys.key_source()}: {problem}")
    try:
        old = tuple(keys.key_id(k) for k in keys.old_keys())
    except TowerError:
        old = ()
    return Context(
        database=database,
        read_database=Setting(safe_url(read_url), read_source) if read_url else None,
        home=Setting(str(home), "TOWER_HOME" if os.environ.get("TOWER_HOME") else "default"),
        migrations_dir=Setting(
            str(default_dir()), "TOWER_MIGRATIONS_DIR" if explicit_dir else "packaged"
        ),
        root_key_id=key,
        old_key_ids=old,
    )
