"""Workloads a and b: start-up, and an up-to-date `migrate` against the connect floor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from common import (
    Sample,
    Workload,
    alternate,
    run_timed,
)
from harness import BenchBase


class StartupWorkloads(BenchBase):
    # a: start-up --------------------------------------------------------------------------

    def startup(self) -> None:
        env = self.tower_env("postgres")
        typer: list[str | Path] = [self.tools.python, "-c", "import typer"]
        for flag in ("--version", "--help"):

            def run(w: Workload, flag: str = flag) -> None:
                contenders: list[tuple[str, Callable[[], Sample]]] = [
                    ("towerctl", lambda: run_timed(self.towerctl(flag), env)),
                    ("import typer", lambda: run_timed(typer, env)),
                ]
                w.series.extend(alternate(contenders, self.profile.startup_reps))

            title = f"towerctl {flag} vs python -c 'import typer'"
            self.add(Workload(f"a.{flag[2:]}", title, 1, "run"), run)

    # b: up-to-date migrate ----------------------------------------------------------------

    def uptodate(self) -> None:
        db = self.schema_template()
        env = self.tower_env(db)
        floor = (
            "import os, psycopg; c = psycopg.connect(os.environ['TOWER_DATABASE_URL']); "
            "c.execute('select 1').fetchone(); c.close()"
        )

        def run(w: Workload) -> None:
            w.series.extend(
                alternate(
                    [
                        ("towerctl", lambda: run_timed(self.towerctl("migrate"), env)),
                        ("psycopg floor", lambda: run_timed([self.tools.python, "-c", floor], env)),
                    ],
                    self.profile.uptodate_reps,
                )
            )

        self.add(
            Workload("b.uptodate", "up-to-date migrate vs psycopg connect + select 1", 1, "run"),
            run,
        )
