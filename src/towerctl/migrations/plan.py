"""The migration plan: a pure function of (files, ledger rows) to the steps to run, or a
refusal naming every problem. No database here."""

from __future__ import annotations

import gc
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from towerctl.errors import BadInput, MigrationError
from towerctl.migrations.files import (
    Migration,
    check_file,
    check_version,
    default_dir,
    tree_checksum,
)

if TYPE_CHECKING:
    from towerctl.migrations.grammar import ParsedScript, Statement
    from towerctl.migrations.lint import Facts


@dataclass(frozen=True)
class AppliedMigration:
    """One row of the ledger."""

    version: int
    name: str
    checksum: str
    applied_at: datetime | None
    execution_ms: float
    baseline: bool = False
    tree_checksum: str | None = None


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    state: str  # applied | pending | changed | missing | duplicate
    checksum: str  # the ledger's when applied, else the file's
    applied_at: datetime | None
    execution_ms: float | None
    baseline: bool = False
    file_checksum: str | None = None
    filename: str | None = None


@dataclass(frozen=True)
class Plan:
    steps: tuple[Migration, ...]
    target: int | None
    allow_out_of_order: bool = False


@dataclass(frozen=True)
class Step:
    """A planned file with its statements, checked and ready to run."""

    migration: Migration
    statements: tuple[Statement, ...]
    parsed: ParsedScript | None = None  # the parse the statements come from
    facts: tuple[Facts, ...] = ()  # what the lint needs of the statements (same parse)

    @property
    def tree_checksum(self) -> str:
        """The file's tree checksum, from its parse (computed on first use: a run asks for it
        while the server runs the file before this one)."""
        if self.parsed is not None:
            return self.parsed.tree_checksum
        return tree_checksum(self.migration.sql)


def find_problems(files: Sequence[Migration], ledger: Sequence[AppliedMigration]) -> list[str]:
    problems: list[str] = []
    by_version: dict[int, list[Migration]] = {}
    for migration in files:
        by_version.setdefault(migration.version, []).append(migration)
    for _version, group in sorted(by_version.items()):
        if len(group) > 1:
            names = " and ".join(m.filename for m in group)
            problems.append(f"duplicate version {group[0].version}: {names} (renumber one of them)")
    for row in ledger:
        same = by_version.get(row.version, [])
        if not same:
            problems.append(f"applied migration {row.version}_{row.name} has no file (missing)")
        elif len(same) == 1 and same[0].checksum != row.checksum:
            problems.append(
                f"{same[0].filename} changed after it was applied (checksum drift); "
                "write a new migration instead of editing an applied one, or "
                f"'towerctl migrate repair {row.version}{_dir_words(same[0])}' if the change "
                "is cosmetic"
            )
    return problems


def _dir_words(migration: Migration) -> str:
    """` --dir FOLDER` when the file is not in the folder a bare command reads."""
    folder = migration.path.parent
    if folder.resolve() == default_dir().resolve():
        return ""
    return f" --dir {shlex.quote(str(folder))}"


def refuse(problems: list[str]) -> MigrationError:
    return MigrationError(
        problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
    )


def plan_migrations(
    files: Sequence[Migration],
    ledger: Sequence[AppliedMigration],
    *,
    target: int | None = None,
    allow_out_of_order: bool = False,
) -> Plan:
    """The files to apply, in order; raises `MigrationError` when the state is unsafe
    and `BadInput` when `target` names no version."""
    if target is not None:
        check_version(target, "--to")
        if target not in {m.version for m in files} | {row.version for row in ledger}:
            raise BadInput(f"--to {target}: no migration has that version")
    problems = find_problems(files, ledger)
    applied = {row.version for row in ledger}
    pending = [m for m in files if m.version not in applied]
    highest = max(applied, default=None)
    if highest is not None and not allow_out_of_order:
        for m in pending:
            if m.version < highest:
                problems.append(
                    f"{m.filename} is pending but version {highest} is already applied "
                    "(out of order; use --allow-out-of-order to apply it anyway)"
                )
    if problems:
        raise refuse(problems)
    steps = tuple(m for m in pending if target is None or m.version <= target)
    return Plan(steps=steps, target=target, allow_out_of_order=allow_out_of_order)


def prepare(plan: Plan) -> list[Step]:
    """Every step checked with PostgreSQL's grammar before anything runs (all problems named)."""
    steps: list[Step] = []
    problems: list[str] = []
    with _collector_paused():
        for migration in plan.steps:
            try:
                steps.append(Step(migration, *check_file(migration)))
            except MigrationError as error:
                problems.append(str(error))
    if problems:
        raise refuse(problems)
    return steps


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Parsing every file allocates many objects at once (the parser's modules, decoded parse
    trees), which sets off the cyclic garbage collector: passes over the whole heap of imported
    modules, 50-70 ms of a run before anything can be sent. Parsing makes no cycles (reference
    counts free the trees), so the collector pauses, and what survives goes to the oldest
    generation unscanned (a freeze and thaw) instead of being scanned young right after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        if not gc.get_freeze_count():  # nobody else froze objects: thawing undoes nothing
            gc.freeze()
            gc.unfreeze()
        gc.enable()


def status(files: Sequence[Migration], ledger: Sequence[AppliedMigration]) -> list[MigrationState]:
    """Every version known to the files or the ledger, with its state."""
    rows = {row.version: row for row in ledger}
    counts: dict[int, int] = {}
    for m in files:
        counts[m.version] = counts.get(m.version, 0) + 1
    states: list[MigrationState] = []
    for m in files:
        row = rows.get(m.version)
        if counts[m.version] > 1:
            states.append(
                MigrationState(
                    m.version,
                    m.name,
                    "duplicate",
                    row.checksum if row else m.checksum,
                    row.applied_at if row else None,
                    row.execution_ms if row else None,
                    bool(row and row.baseline),
                    m.checksum,
                    m.filename,
                )
            )
        elif row is None:
            states.append(
                MigrationState(
                    m.version,
                    m.name,
                    "pending",
                    m.checksum,
                    None,
                    None,
                    False,
                    m.checksum,
                    m.filename,
                )
            )
        else:
            state = "applied" if row.checksum == m.checksum else "changed"
            states.append(
                MigrationState(
                    m.version,
                    m.name,
                    state,
                    row.checksum,
                    row.applied_at,
                    row.execution_ms,
                    row.baseline,
                    m.checksum,
                    m.filename,
                )
            )
    file_versions = set(counts)
    for row in ledger:
        if row.version not in file_versions:
            states.append(
                MigrationState(
                    row.version,
                    row.name,
                    "missing",
                    row.checksum,
                    row.applied_at,
                    row.execution_ms,
                    row.baseline,
                )
            )
    states.sort(key=lambda s: (s.version, s.filename or ""))
    return states


def describe_plan(steps: Sequence[Step]) -> list[str]:
    return [
        f"would apply {s.migration.filename}"
        + ("" if s.migration.transactional else "  (no transaction)")
        for s in steps
    ]
