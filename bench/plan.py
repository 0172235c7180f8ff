"""The bench: every workload, the plan, the targets and the growth table."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from common import (
    FULL,
    Target,
    Workload,
    log,
)
from export import ExportWorkloads
from migrations import MigrationWorkloads
from requests_batch import RequestWorkloads
from startup import StartupWorkloads

# Workloads that other work may add: bench/<name>.py with `LETTER` (its --only letter) and
# `run(bench: Bench) -> None`. They run when present, unless `BY_DEFAULT = False` (then
# only when --only names them).
OPTIONAL_WORKLOADS = ("batch", "purge", "lint", "scale")


def optional_workloads() -> list[ModuleType]:
    found: list[ModuleType] = []
    for name in OPTIONAL_WORKLOADS:
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as missing:
            if missing.name != name:
                raise
    return found


class Bench(StartupWorkloads, MigrationWorkloads, RequestWorkloads, ExportWorkloads):
    # the plan ------------------------------------------------------------------------------

    def run(self, only: str) -> None:
        p = self.profile
        if "a" in only:
            self.startup()
        if "b" in only:
            self.uptodate()
        if "c" in only:
            self.project_migrations()
        if "d" in only:
            self.many_migrations(p.migrations, p.many_reps, "d.migrations", floor=True)
        if "e" in only:
            self.batch(p.requests, p.batch_reps, "e.batch")
        if "f" in only:
            check = Workload("f.check", "export output: towerctl against psql", 0, "messages")
            if self.messages_available():
                small = max(p.messages // 100, 1_000)
                self.add(check, lambda w: w.notes.extend(self.export_equivalence(small)))
            self.export(p.messages, p.export_reps, ("ndjson", "csv", "json"), "f")
        if "g" in only:
            for scale in (100, 10):
                self.many_migrations(p.migrations // scale, p.growth_reps, f"g.migrations/{scale}")
                self.batch(p.requests // scale, p.growth_reps, f"g.batch/{scale}")
                self.export(p.messages // scale, p.growth_reps, ("ndjson",), f"g.export/{scale}")
        for module in optional_workloads():
            if module.LETTER in only:
                module.run(self)
        if "f" in only and not self.get("f.ndjson", "towerctl") and self.messages_available():
            log("towerctl session messages exists now: measuring the export again")
            self.workloads = [w for w in self.workloads if not w.key.startswith("f.")]
            self.export(p.messages, p.export_reps, ("ndjson", "csv", "json"), "f")

    # targets and growth ----------------------------------------------------------------------

    def targets(self) -> list[Target]:
        def ratio(key: str, peer: str) -> float | None:
            w = self.workload(key)
            return w.ratio(peer) if w else None

        def shown(value: float | None, suffix: str = "×") -> str:
            return "n/a" if value is None else f"{value:.2f}{suffix}"

        version = ratio("a.version", "import typer")
        uptodate = ratio("b.uptodate", "psycopg floor")
        helped = ratio("a.help", "import typer")
        many = ratio("d.migrations", "dbmate")
        floor = ratio("d.migrations", "psql (server floor)")
        yoyo = ratio("c.project", "yoyo")
        batch = ratio("e.batch", "pgbench")
        throughput = None if batch is None else 1 / batch
        ndjson = ratio("f.ndjson", "psql \\copy")
        export = self.get("f.ndjson", "towerctl")
        peak = export.peak_mb if export else None
        n = f"{self.profile.messages:,}"
        full_size = self.profile.messages == FULL.messages  # the size the targets name
        linear = self.export_linearity()
        linear_cpu = self.export_linearity(cpu=True)
        return [
            Target("--version ≤ 1.1× import typer", version, 1.1, False, shown(version)),
            Target("--help ≤ 1.1× import typer", helped, 1.1, False, shown(helped)),
            Target(
                "up-to-date migrate ≤ 1.25× psycopg floor", uptodate, 1.25, False, shown(uptodate)
            ),
            Target(
                f"{self.profile.migrations} migrations ≤ 1.1× dbmate", many, 1.1, False, shown(many)
            ),
            Target(
                f"{self.profile.migrations} migrations ≤ 1.1× psql server floor",
                floor,
                1.1,
                False,
                shown(floor),
            ),
            Target("project's migrations faster than yoyo", yoyo, 1.0, False, shown(yoyo)),
            Target(
                "batch requests, every commit durable, ≥ 0.6× pgbench (direct connection)",
                throughput,
                0.6,
                True,
                shown(throughput),
            ),
            Target(
                f"NDJSON export ≤ 1.2× psql \\copy (at {n} messages)",
                ndjson,
                1.2,
                False,
                shown(ndjson),
                applies=full_size,
            ),
            Target(
                f"export peak memory ≤ 100 MB (at {n} messages)",
                peak,
                100.0,
                False,
                shown(peak, " MB"),
                applies=full_size,
            ),
            Target(
                "export grows linearly: marginal wall time per message, 10×→100× over 1×→10×",
                linear,
                1.25,
                False,
                shown(linear),
            ),
            Target(
                "(the same in towerctl's CPU time, for comparison)",
                linear_cpu,
                1.25,
                False,
                shown(linear_cpu),
            ),
        ]

    def growth_rows(self) -> list[dict[str, Any]]:
        """For d, e, f: time and memory at 1×, 10×, 100× the work, towerctl and its peer,
        with the marginal cost of each step (the difference to the size before, per unit),
        in wall-clock and in CPU time of the measured process."""
        rows: list[dict[str, Any]] = []
        for name, full, peer in (
            ("migrations", "d.migrations", "dbmate"),
            ("batch", "e.batch", "pgbench"),
            ("export", "f.ndjson", "psql \\copy"),
        ):
            keys = [f"g.{name}/100", f"g.{name}/10", full]
            if name == "export":
                keys = ["g.export/100.ndjson", "g.export/10.ndjson", full]
            for tool in ("towerctl", peer):
                before: tuple[int, float, float] | None = None
                for key, scale in zip(keys, ("1×", "10×", "100×"), strict=True):
                    w = self.workload(key)
                    s = w.get(tool) if w else None
                    if w is None or s is None:
                        continue
                    marginal = marginal_cpu = None
                    if before is not None and w.units > before[0]:
                        extra = w.units - before[0]
                        marginal = (s.median - before[1]) / extra * 1e6
                        marginal_cpu = (s.median_cpu - before[2]) / extra * 1e6
                    before = (w.units, s.median, s.median_cpu)
                    rows.append(
                        {
                            "workload": name,
                            "scale": scale,
                            "units": w.units,
                            "unit": w.unit,
                            "tool": tool,
                            "medianSeconds": s.median,
                            "medianCpuSeconds": s.median_cpu,
                            "microsecondsPerUnit": s.median / w.units * 1e6,
                            "marginalMicroseconds": marginal,
                            "marginalCpuMicroseconds": marginal_cpu,
                            "peakMemoryMB": s.peak_mb,
                        }
                    )
        return rows

    def export_linearity(self, cpu: bool = False) -> float | None:
        """towerctl's marginal cost per message from 10× to 100× over that from 1× to 10×."""
        marginal = [
            r["marginalCpuMicroseconds" if cpu else "marginalMicroseconds"]
            for r in self.growth_rows()
            if r["workload"] == "export" and r["tool"] == "towerctl"
        ]
        if len(marginal) != 3 or not marginal[1] or marginal[2] is None:
            return None
        return float(marginal[2] / marginal[1])
