"""The bench's shared state: tools, server, environments, the schema template."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import (
    Profile,
    Series,
    ToolFailed,
    Workload,
    log,
    run_quiet,
)
from tools import (
    Server,
    Tools,
)

# --- the bench -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    session_id: str
    token_file: Path


class BenchBase:
    def __init__(self, tools: Tools, server: Server, profile: Profile, work: Path) -> None:
        self.tools, self.server, self.profile, self.work = tools, server, profile, work
        self.root_key = secrets.token_hex(32)
        self.home = work / "home"
        self.home.mkdir()
        self.workloads: list[Workload] = []
        self.template: str | None = None
        self.export_dbs: dict[int, Opened] = {}
        self.export_db_names: dict[int, str] = {}

    # environments ---------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        drop = ("TOWER_", "PG", "DBMATE_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.pop("DATABASE_URL", None)
        env["NO_COLOR"] = "1"
        return env

    def tower_env(self, db: str) -> dict[str, str]:
        return self.base_env() | {
            "TOWER_DATABASE_URL": self.server.url(db),
            "TOWER_HOME": str(self.home),
            "TOWER_ROOT_KEY": self.root_key,
        }

    def pg_env(self, db: str) -> dict[str, str]:
        return self.base_env() | self.server.libpq_env(db)

    def towerctl(self, *args: str | Path) -> list[str | Path]:
        return [self.tools.towerctl, *args]

    # shared preparation -----------------------------------------------------------------

    def schema_template(self) -> str:
        """A database migrated by towerctl, copied for every run that needs the schema."""
        if self.template is None:
            name = self.server.create()
            run_quiet(self.towerctl("migrate"), self.tower_env(name))
            self.template = name
        return self.template

    def open_session(self, db: str, deposit: int = 100_000_000) -> Opened:
        out = run_quiet(
            self.towerctl("session", "open", "--deposit", str(deposit), "--json"),
            self.tower_env(db),
        )
        doc = json.loads(out)
        token = self.work / f"token-{db}"
        token.write_text(doc["macaroon"] + "\n")
        token.chmod(0o600)
        return Opened(doc["sessionId"], token)

    def add(self, workload: Workload, run: Callable[[Workload], None]) -> Workload:
        log(f"{workload.key}: {workload.title}")
        load_before = os.getloadavg()[0]
        try:
            run(workload)
        except ToolFailed as failure:
            workload.error = str(failure)
            log(f"{workload.key}: FAILED: {failure}")
        load_after = os.getloadavg()[0]
        workload.notes.append(f"load average {load_before:.2f} before, {load_after:.2f} after")
        self.workloads.append(workload)
        return workload

    def get(self, key: str, tool: str) -> Series | None:
        workload = next((w for w in self.workloads if w.key == key), None)
        return workload.get(tool) if workload else None

    def workload(self, key: str) -> Workload | None:
        return next((w for w in self.workloads if w.key == key), None)
