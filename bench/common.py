"""What every workload shares: profiles, timing a process, series and targets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS = BENCH / ".peers"
WORK = BENCH / ".work"
PROJECT_SQL = REPO / "sql"

# --- profiles ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    startup_reps: int  # a
    uptodate_reps: int  # b
    fresh_reps: int  # c
    many_reps: int  # d
    batch_reps: int  # e
    export_reps: int  # f
    growth_reps: int  # g (the 1/100 and 1/10 sizes; the full size comes from d, e, f)
    migrations: int
    requests: int
    messages: int


FULL = Profile("full", 31, 31, 11, 9, 9, 9, 7, 300, 1_000, 1_000_000)
QUICK = Profile("quick", 11, 11, 5, 3, 5, 5, 3, 300, 1_000, 100_000)


# --- measuring a process -----------------------------------------------------------------


class ToolFailed(Exception):
    """A measured or preparing command exited non-zero (or produced wrong output)."""


@dataclass(frozen=True)
class Sample:
    seconds: float  # wall clock, fork to exit
    cpu_seconds: float  # user + system of the process (and the children it waited for)
    peak_kb: int  # ru_maxrss of the process


GNU_TIME = Path("/usr/bin/time")


def run_timed(
    cmd: Sequence[str | Path],
    env: dict[str, str],
    *,
    stdin: Path | None = None,
    stdout: Path | None = None,
    cwd: Path | None = None,
) -> Sample:
    """Run `cmd` once: its wall-clock time, CPU time and peak resident memory.

    The peak comes from `wait4` in a small parent, GNU time, when there is one: a child
    forked by this harness starts with the harness's own resident set, and Linux keeps
    that high-water mark across `exec`, so `wait4` here would report at least the
    harness's size. Without GNU time the figure is that upper bound (noted in JSON).
    """
    argv = [str(a) for a in cmd]
    with contextlib.ExitStack() as stack:
        fin = stack.enter_context(open(stdin or os.devnull, "rb"))
        fout = stack.enter_context(open(stdout or os.devnull, "wb"))
        ferr = stack.enter_context(tempfile.TemporaryFile())
        report = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "time"
        if GNU_TIME.exists():
            argv = [str(GNU_TIME), "-q", "-f", "%M", "-o", str(report), *argv]
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            ferr.seek(0)
            tail = ferr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            name = Path(str(cmd[0])).name
            raise ToolFailed(f"{name} exited {proc.returncode}: {' | '.join(tail)}")
        peak_kb = int(report.read_text().split()[-1]) if report.exists() else usage.ru_maxrss
    return Sample(elapsed, usage.ru_utime + usage.ru_stime, peak_kb)


def run_quiet(cmd: Sequence[str | Path], env: dict[str, str] | None = None, **kw: Any) -> str:
    """Run a preparing command (not measured); its stdout, or `ToolFailed`."""
    result = subprocess.run(
        [str(a) for a in cmd], env=env, capture_output=True, text=True, check=False, **kw
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ToolFailed(f"{Path(str(cmd[0])).name} exited {result.returncode}: {' | '.join(tail)}")
    return str(result.stdout)


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


# --- results -----------------------------------------------------------------------------


@dataclass
class Series:
    tool: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(s.seconds for s in self.samples)

    @property
    def median_cpu(self) -> float:
        return statistics.median(s.cpu_seconds for s in self.samples)

    @property
    def peak_mb(self) -> float:
        return max(s.peak_kb for s in self.samples) / 1024

    def summary(self) -> dict[str, Any]:
        times = [s.seconds for s in self.samples]
        return {
            "tool": self.tool,
            "runs": len(times),
            "medianSeconds": self.median,
            "minSeconds": min(times),
            "maxSeconds": max(times),
            "medianCpuSeconds": self.median_cpu,
            "peakMemoryMB": self.peak_mb,
            "samples": [asdict(s) for s in self.samples],
        }


@dataclass
class Workload:
    key: str  # e.g. "d.migrations"
    title: str
    units: int  # the amount of work of one run (requests, messages, migrations); 1 if none
    unit: str
    series: list[Series] = field(default_factory=list)  # towerctl first, then its peers
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def get(self, tool: str) -> Series | None:
        return next((s for s in self.series if s.tool == tool and s.samples), None)

    def ratio(self, peer: str) -> float | None:
        """towerctl's median time over the peer's."""
        mine, theirs = self.get("towerctl"), self.get(peer)
        if mine is None or theirs is None:
            return None
        return mine.median / theirs.median

    def summary(self) -> dict[str, Any]:
        peers = [s.tool for s in self.series if s.tool != "towerctl"]
        return {
            "key": self.key,
            "title": self.title,
            "units": self.units,
            "unit": self.unit,
            "series": [s.summary() for s in self.series if s.samples],
            "ratios": {p: self.ratio(p) for p in peers},
            "notes": self.notes,
            "error": self.error,
        }


@dataclass(frozen=True)
class Target:
    name: str
    measured: float | None  # the quantity compared with the limit
    limit: float
    at_least: bool  # True: measured >= limit passes; False: measured <= limit passes
    shown: str  # how the measured value reads in the table
    applies: bool = True  # False: measured at another size than the target names

    @property
    def met(self) -> bool | None:
        if self.measured is None or not self.applies:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def summary(self) -> dict[str, Any]:
        return asdict(self) | {"met": self.met}


def alternate(
    contenders: Sequence[tuple[str, Callable[[], Sample]]], reps: int, warmup: int = 1
) -> list[Series]:
    """Run the contenders in turn, A B A B ..., `warmup` unmeasured rounds first."""
    series = [Series(name) for name, _ in contenders]
    for rep in range(warmup + reps):
        for one, (_, run) in zip(series, contenders, strict=True):
            sample = run()
            if rep >= warmup:
                one.samples.append(sample)
    return series


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
