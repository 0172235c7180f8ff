"""Migration files: finding and reading `NNNN_name.sql`, versions, checksums, and the
statement checks PostgreSQL's grammar makes before anything runs."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from towerctl.errors import BadInput, MigrationError

if TYPE_CHECKING:
    from towerctl.migrations.grammar import ParsedScript, Statement
    from towerctl.migrations.lint import Facts

FILE_NAME = re.compile(r"^([0-9]+)_([A-Za-z0-9][A-Za-z0-9_.\-]*)\.sql$", re.ASCII | re.IGNORECASE)
MIGRATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", re.ASCII)
MAX_VERSION = 2**63 - 1  # PostgreSQL's bigint
NO_TRANSACTION_MARK = "-- towerctl:no-transaction"
BOM = "\ufeff"


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: int
    name: str
    path: Path
    checksum: str
    sql: str = field(repr=False)
    transactional: bool = True

    @property
    def filename(self) -> str:
        return self.path.name


def checksum(data: bytes) -> str:
    """SHA-256 of a file with CRLF normalised to LF."""
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def tree_checksum(sql: str) -> str:
    """SHA-256 of the file's parse tree without locations: unchanged by cosmetic edits."""
    from towerctl.migrations import grammar  # pglast: only when a file is parsed

    return grammar.tree_checksum(sql.removeprefix(BOM))


def default_dir() -> Path:
    """The migrations shipped in the package (or the repository's `sql/` when run from source)."""
    explicit = os.environ.get("TOWER_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    packaged = Path(__file__).parents[1] / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "sql"


def check_version(value: int, what: str) -> int:
    """A version as given on the command line: within bigint, else exit 2."""
    if not 0 <= value <= MAX_VERSION:
        raise BadInput(f"{what} {value}: versions are whole numbers from 0 to {MAX_VERSION}")
    return value


def read_migration(path: Path, version: int, name: str) -> Migration:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MigrationError(f"cannot read {path}: {error.strerror}") from None
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").removeprefix(BOM)
    except UnicodeDecodeError:
        raise MigrationError(f"{path.name} is not UTF-8 text") from None
    if "\x00" in text:
        raise MigrationError(f"{path.name} contains a NUL byte")
    first_line = text.split("\n", 1)[0].strip()
    return Migration(
        version=version,
        name=name,
        path=path,
        checksum=checksum(data),
        sql=text,
        transactional=first_line != NO_TRANSACTION_MARK,
    )


def discover(directory: Path) -> list[Migration]:
    """Every `NNNN_name.sql` (any letter case of `.sql`) in `directory`, by version then name."""
    if directory.exists() and not directory.is_dir():
        raise MigrationError(f"{directory} is not a folder of migrations")
    if not directory.is_dir():
        raise BadInput(
            f"migrations folder not found: {directory}",
            hint="check --dir or TOWER_MIGRATIONS_DIR",
        )
    found: list[Migration] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError as error:
        raise MigrationError(f"cannot list {directory}: {error.strerror}") from None
    for path in entries:
        if not path.name.lower().endswith(".sql"):
            continue
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(
                f"{path.name} is not named like NNNN_name.sql (ASCII digits, then a name)",
                hint="rename it or move it out of the migrations folder",
            )
        version = int(match.group(1))
        if version > MAX_VERSION:
            raise MigrationError(
                f"{path.name}: version {match.group(1)} is beyond PostgreSQL's bigint",
                hint="renumber the file",
            )
        if not path.is_file():
            raise MigrationError(f"{path.name} is not a regular file")
        found.append(read_migration(path, version, match.group(2)))
    found.sort(key=lambda m: (m.version, m.filename))
    return found


def check_statements(migration: Migration) -> tuple[Statement, ...]:
    """The file's statements as PostgreSQL's grammar reads them (see `check_file`)."""
    return check_file(migration)[0]


def check_file(
    migration: Migration,
) -> tuple[tuple[Statement, ...], ParsedScript | None, tuple[Facts, ...]]:
    """The file's statements as PostgreSQL's grammar reads them, the parse (for its tree
    checksum) and what the lint needs of each statement, or `MigrationError` naming the file
    and line of anything the run would refuse: a syntax error, transaction control, a COPY that
    needs the client's data stream, a statement that cannot run in (or, in a no-transaction
    file, cannot safely re-run outside) a transaction. Each statement is checked as it is read
    and kept without its parse node: a run holds every file's statements at once, and keeping
    the decoded trees would only feed the garbage collector."""
    from towerctl.migrations import grammar  # pglast: only when a file is parsed
    from towerctl.migrations.facts import read_statement

    facts: list[Facts] = []

    def keep(s: Statement) -> Statement:
        _check_statement(migration, s)
        found = read_statement(s)
        if found is not None:
            facts.append(found)
        return grammar.Statement(s.text, s.line, s.kind)

    parsed: ParsedScript | None = None
    try:
        parsed = grammar.parse(migration.sql, keep)
        statements = parsed.statements
    except grammar.SQLSyntaxError as error:
        # psql-style COPY data after `COPY … FROM STDIN;` is what the grammar tripped on.
        try:
            before = grammar.parse_script(migration.sql[: error.index])
        except grammar.SQLSyntaxError:
            before = []
        if not (before and grammar.copy_with_client(before[-1])):
            raise MigrationError(f"{migration.filename}, line {error.line}: {error}") from None
        facts.clear()
        statements = [keep(s) for s in before]
    return tuple(statements), parsed, tuple(facts)


def _check_statement(migration: Migration, s: Statement) -> None:
    from towerctl.migrations import grammar

    name = migration.filename
    if grammar.is_transaction_control(s):
        verb = s.text.split(None, 1)[0].upper() if s.text else "?"
        raise MigrationError(
            f"{name}, line {s.line}: transaction control ({verb}) is not allowed; "
            "towerctl runs each file in one transaction",
            hint=f"remove it, or make the first line '{NO_TRANSACTION_MARK}'",
        )
    copy = grammar.copy_with_client(s)
    if copy:
        raise MigrationError(
            f"{name}, line {s.line}: COPY … {copy} cannot run from a migration file",
            hint="load the data with INSERT, or COPY from a server-side file",
        )
    if migration.transactional and grammar.needs_no_transaction(s):
        raise MigrationError(
            f"{name}, line {s.line}: {_first_words(s)} cannot run inside a transaction",
            hint=f"put it in its own file whose first line is '{NO_TRANSACTION_MARK}'",
        )
    if not migration.transactional and not grammar.rerunnable(s):
        raise MigrationError(
            f"{name}, line {s.line}: {_first_words(s)} is not allowed in a no-transaction "
            "file, which may only hold statements safe to run again after a failure "
            "(CREATE INDEX CONCURRENTLY IF NOT EXISTS, DROP INDEX CONCURRENTLY IF EXISTS, "
            "REINDEX CONCURRENTLY, VACUUM, ANALYZE, ALTER TYPE … ADD VALUE IF NOT EXISTS, "
            "SELECT)",
            hint="move it to a transactional file",
        )


def _first_words(statement: Statement) -> str:
    return " ".join(statement.text.split()[:4]).upper()


def tree_or_none(migration: Migration) -> str | None:
    from towerctl.migrations import grammar  # pglast: only when a file is parsed

    try:
        return tree_checksum(migration.sql)
    except grammar.SQLSyntaxError:
        return None


def new_file(directory: Path, name: str) -> Path:
    """Write the next numbered, empty migration file and return its path; never into the
    installed package's own migrations (every store of that install would see it)."""
    packaged = Path(__file__).parents[1] / "sql"
    if packaged.is_dir() and directory.resolve() == packaged.resolve():
        raise BadInput(
            f"{directory} holds the migrations installed with towerctl; a new file there "
            "would be pending for every store of this install",
            hint="write your migrations in a folder of your own: --dir, TOWER_MIGRATIONS_DIR "
            "or ./migrations",
        )
    if not MIGRATION_NAME.match(name) or len(name) > 200:
        raise BadInput(
            f"migration name {name!r} must be ASCII letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    files = discover(directory)
    highest = max((m.version for m in files), default=0)
    if highest >= MAX_VERSION:
        raise MigrationError(f"version {highest} is the highest a migration can have")
    width = max([4] + [len(m.filename.split("_", 1)[0]) for m in files])
    path = directory / f"{highest + 1:0{width}d}_{name}.sql"
    try:
        with path.open("x", encoding="utf-8"):
            pass
    except FileExistsError:
        raise MigrationError(f"{path.name} already exists") from None
    except OSError as error:
        raise MigrationError(f"cannot write {path}: {error.strerror}") from None
    return path
