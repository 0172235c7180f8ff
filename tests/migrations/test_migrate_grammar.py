"""towerctl finds statements with PostgreSQL's own grammar (pglast): checked against the server.

The differential test sends each hostile script to the server as one simple query
(the server splits it) and, separately, statement by statement as towerctl split it;
the command tags and rows must be the same, in the same order, and towerctl's
transaction-control findings must be exactly the statements the server ran as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CLI, direct
from towerctl.errors import ExitCode
from towerctl.migrations import grammar

# Each fragment is one statement; `{c}` marks where a comment or whitespace goes.
FRAGMENTS = [
    "SELECT{c} 1 AS a$$",  # `$` inside an identifier: not a dollar quote
    "SELECT 1 AS x$z${c}, $z$;$z$ AS y",  # identifier x$z$ then a body ';'
    "SELECT $é$;{c}$é$",  # a non-ASCII dollar tag
    "SELECT{c} 'ü;' AS \"ñ;\"{c}",
    "SELECT $a$ $b$ ; $b$ ; $a${c}",  # nested tags
    "SELECT{c} E'\\';' AS e",  # backslash escape hides a quote
    "SELECT '\\'{c} AS plain",  # standard strings: the backslash is data
    "SELECT U&'\\0041;'{c}",
    "SELECT U&'!0041;' UESCAPE '!'",
    "SELECT{c} $$ -- not a comment ; $$",
    "SELECT '/* not a comment ; */'{c}",
    'SELECT "$$"{c} FROM (SELECT 1 AS "$$") t',
    "SELECT $_$ $$ ; $$ $_${c}",
    "BEGIN{c}",
    "COMMIT{c}",
    "ROLLBACK",
    "START{c} TRANSACTION",
    "END",
]
COMMENTS = ["", " ", "\n", "/* ; */", "/* /* ; $$ */ ' */", "-- ; $$ '\n", "/*é;*/", "\t--\n"]
CONTROL_TAGS = {"BEGIN", "COMMIT", "ROLLBACK", "START TRANSACTION"}


def results(cur: psycopg.Cursor[Any]) -> list[tuple[str, Any]]:
    out = []
    while True:
        out.append((cur.statusmessage or "", cur.fetchall() if cur.description else None))
        if not cur.nextset():
            return out


@st.composite
def scripts(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=6))
    pieces = [draw(st.sampled_from(COMMENTS))]
    for part in parts:
        while "{c}" in part:
            part = part.replace("{c}", draw(st.sampled_from(COMMENTS)), 1)
        pieces.append(part + draw(st.sampled_from(["", " ", "\n", "/*;*/"])) + ";")
        pieces.append(draw(st.sampled_from(COMMENTS)))
    if draw(st.booleans()):
        pieces[-1] = pieces[-1].rstrip(";")
    return "".join(pieces)


@pytest.mark.timeout(240)
@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=scripts())
def test_statements_match_what_the_server_runs(empty_db_url: str, script: str) -> None:
    with psycopg.connect(empty_db_url, autocommit=True) as whole, whole.cursor() as cur:
        cur.execute(script)  # no parameters: one simple query, split by the server
        server = results(cur)
        whole.execute("ROLLBACK")
    ours = grammar.parse_script(script)
    split: list[tuple[str, Any]] = []
    with psycopg.connect(empty_db_url, autocommit=True) as single, single.cursor() as cur:
        for statement in ours:
            cur.execute(statement.text)
            split.extend(results(cur))
        single.execute("ROLLBACK")
    assert split == server, script
    control = [i for i, s in enumerate(ours) if grammar.is_transaction_control(s)]
    assert control == [i for i, (tag, _) in enumerate(server) if tag in CONTROL_TAGS], script


def test_lines_are_those_of_the_first_token() -> None:
    script = "-- lead\n/* x\n */ SELECT 'é;'\n;\n\n  CREATE TABLE t (\n id int);\nSELECT 2"
    got = [(s.line, s.kind) for s in grammar.parse_script(script)]
    assert got == [(3, "SelectStmt"), (6, "CreateStmt"), (8, "SelectStmt")]


def test_cosmetic_edits_keep_the_parse_tree() -> None:
    a = grammar.parse_tree("CREATE TABLE t (id int); -- hi\nselect 1;")
    b = grammar.parse_tree("/* new */ create   table T (\n  ID INT\n);\nSELECT 1")
    assert a == b
    assert a != grammar.parse_tree("CREATE TABLE t (id bigint); SELECT 1;")
    assert a != grammar.parse_tree('CREATE TABLE "T" (id int); SELECT 1;')
    assert a != grammar.parse_tree("CREATE TABLE t (id int); SELECT 2;")


# --- files, as the operator meets them ------------------------------------------


def write(folder: Path, name: str, body: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if isinstance(body, bytes):
        path.write_bytes(body)
    else:
        path.write_text(body)
    return path


def user_tables(url: str) -> set[str]:
    with psycopg.connect(url) as c:
        rows = c.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        ).fetchall()
    return {r[0] for r in rows if not r[0].startswith("tower_schema_migration")}


def run(cli: CLI, url: str, folder: Path, *args: str) -> Any:
    return cli("--database-url", url, "migrate", "--dir", str(folder), *args)


@pytest.mark.timeout(60)
def test_commit_hidden_from_a_hand_lexer_is_refused_before_anything_runs(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    # A hand lexer reading `x$z$` as the start of a dollar body sees one statement here;
    # PostgreSQL sees three, the second a COMMIT.
    folder = tmp_path / "sql"
    write(folder, "0001_ok.sql", "CREATE TABLE ok (id int);\n")
    write(
        folder,
        "0002_sneaky.sql",
        "CREATE TABLE one (x$z$ int);\nCOMMIT;\n"
        "CREATE TABLE two (id int, c text DEFAULT $z$ $z$);\n",
    )
    for args in ((), ("--dry-run",)):
        result = run(cli, empty_db_url, folder, *args)
        assert result.exit_code == ExitCode.MIGRATION, result.stderr
        assert "0002_sneaky.sql, line 2: transaction control (COMMIT)" in result.stderr
    assert user_tables(empty_db_url) == set()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("CREATE TABLE a (id int);\nCOPY a FROM STDIN;\n1\n\\.\n", 2, "COPY … FROM STDIN"),
        ("CREATE TABLE a (id int);\n\nCREATE TABEL b (id int);\n", 3, "syntax error"),
        ("CREATE TABLE a (id int);\nSELECT $$ never closed;\n", 2, "unterminated"),
        ("CREATE TABLE a (id int);\nVACUUM a;\n", 2, "cannot run inside a transaction"),
    ],
)
def test_files_the_server_cannot_run_are_refused_with_file_and_line(
    cli: CLI, empty_db_url: str, tmp_path: Path, body: str, line: int, words: str
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_first.sql", "CREATE TABLE first (id int);\n")
    write(folder, "0002_bad.sql", body)
    for args in (("--dry-run",), ()):
        result = run(cli, empty_db_url, folder, *args)
        assert result.exit_code == ExitCode.MIGRATION, result.stderr
        assert f"0002_bad.sql, line {line}" in result.stderr and words in result.stderr
    assert user_tables(empty_db_url) == set(), "nothing runs before every file is checked"


@pytest.mark.timeout(60)
def test_bom_upper_case_suffix_and_versions(cli: CLI, empty_db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_bom.sql", b"\xef\xbb\xbfCREATE TABLE bom (id int);\n")
    write(folder, "0002_upper.SQL", "CREATE TABLE upper_case (id int);\n")
    result = run(cli, empty_db_url, folder)
    assert result.exit_code == ExitCode.OK, result.stderr
    assert user_tables(empty_db_url) == {"bom", "upper_case"}
    too_big = run(cli, empty_db_url, folder, "--to", "9" * 30)
    assert too_big.exit_code == ExitCode.BAD_INPUT and "bigint" not in too_big.stdout
    write(folder, f"{'9' * 30}_huge.sql", "SELECT 1;\n")
    huge = run(cli, empty_db_url, folder)
    assert huge.exit_code == ExitCode.MIGRATION and "beyond PostgreSQL's bigint" in huge.stderr
    (folder / f"{'9' * 30}_huge.sql").unlink()
    write(folder, "٠٠٠3_arabic.sql", "SELECT 1;\n")  # Arabic-Indic digits are not a version
    arabic = run(cli, empty_db_url, folder)
    assert arabic.exit_code == ExitCode.MIGRATION and "ASCII digits" in arabic.stderr


@pytest.mark.timeout(60)
def test_no_transaction_files_hold_only_rerunnable_statements(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_t.sql", "CREATE TABLE t (id int);\n")
    write(
        folder,
        "0002_idx.sql",
        "-- towerctl:no-transaction\nCREATE INDEX CONCURRENTLY IF NOT EXISTS t_i ON t (id);\n"
        "INSERT INTO t VALUES (1);\n",
    )
    for args in (("--dry-run",), ()):
        refused = run(cli, empty_db_url, folder, *args)
        assert refused.exit_code == ExitCode.MIGRATION
        assert "0002_idx.sql, line 3: INSERT INTO T VALUES" in refused.stderr
        assert "no-transaction" in refused.stderr
    assert user_tables(empty_db_url) == set()


@pytest.mark.timeout(60)
def test_no_transaction_failure_says_which_statements_ran_and_reruns(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sql"
    write(folder, "0001_t.sql", "CREATE TABLE t (id int, v int);\nINSERT INTO t VALUES (1, 1);\n")
    body = (
        "-- towerctl:no-transaction\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_id ON t (id);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_v ON t (nope);\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS t_iv ON t (id, v);\n"
    )
    write(folder, "0002_idx.sql", body)
    failed = run(cli, empty_db_url, folder)
    assert failed.exit_code == ExitCode.MIGRATION
    assert "0002_idx.sql, line 3" in failed.stderr
    assert "statements at line 2 ran" in failed.stderr
    write(folder, "0002_idx.sql", body.replace("(nope)", "(v)"))
    again = run(cli, empty_db_url, folder)
    assert again.exit_code == ExitCode.OK, again.stderr
    with psycopg.connect(empty_db_url) as c:
        names = {r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE tablename='t'")}
        lease = c.execute("SELECT count(*) FROM tower_schema_migration_lease").fetchone()
    assert names == {"t_id", "t_v", "t_iv"}
    assert lease == (0,)


def recorded_tree_checksum(script: str) -> str:
    """The tree checksum as towerctl recorded it in ledgers before files were parsed once:
    libpg_query's JSON, decoded, every location key removed at any depth, sorted JSON."""
    import hashlib
    import json

    from pglast import parser

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in {"location", "stmt_location", "stmt_len"}
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    tree = json.loads(parser.parse_sql_json(script))
    stripped = [strip(item["stmt"]) for item in tree.get("stmts", [])]
    return hashlib.sha256(json.dumps(stripped, sort_keys=True).encode()).hexdigest()


def test_tree_checksum_is_the_one_ledgers_already_hold() -> None:
    """`repair` compares with tree checksums recorded by earlier towerctl: same digest."""
    from towerctl.migrations.files import default_dir

    bodies = [p.read_text() for p in sorted(default_dir().glob("*.sql"))]
    bodies += [f.replace("{c}", "/* c */") + ";" for f in FRAGMENTS]
    bodies += [
        'CREATE TABLE "location" (location int, """location"":1" text);',
        'SELECT \'"location":5,\' AS location, $$"location":1$$ FROM t WHERE location = 1;',
        "ALTER TABLE t SET (fillfactor = 70); REINDEX (CONCURRENTLY false) TABLE t;",
        "SELECT 'é', 'ü' AS \"ñ\"; CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (a);",
    ]
    assert len(bodies) > 20
    for body in bodies:
        assert grammar.tree_checksum(body) == recorded_tree_checksum(body), body


@settings(max_examples=200, deadline=None)
@given(script=scripts())
def test_tree_checksum_matches_the_recorded_one_on_hostile_sql(script: str) -> None:
    assert grammar.tree_checksum(script) == recorded_tree_checksum(script), script


@pytest.mark.timeout(120)
def test_ledger_rows_hold_the_recorded_tree_checksum(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    """The run computes each file's tree checksum from the parse it checked; the ledger gets
    the digest earlier towerctl recorded, for transactional files, the run's last file and a
    no-transaction file alike; steps keep no trees."""
    from towerctl import migrations

    folder = tmp_path / "sql"
    bodies = {
        "0001_a.sql": "CREATE TABLE a (id int, location text); -- a comment\n",
        "0002_b.sql": 'SELECT \'é\' AS "ñ", $x$"location":1$x$;\nCREATE TABLE b (v int);\n',
        "0003_c.sql": f"{migrations.NO_TRANSACTION_MARK}\nCREATE INDEX CONCURRENTLY "
        "IF NOT EXISTS b_v ON b (v);\n",
        "0004_d.sql": "ALTER TABLE a ADD COLUMN note text;\nCOMMENT ON TABLE a IS 'x;y';\n",
    }
    for name, body in bodies.items():
        write(folder, name, body)
    plan = migrations.plan_migrations(migrations.discover(folder), [])
    steps = migrations.prepare(plan)
    assert all(s.node is None for step in steps for s in step.statements)
    assert [step.tree_checksum for step in steps] == [
        recorded_tree_checksum(body) for body in bodies.values()
    ]
    result = run(cli, empty_db_url, folder)
    assert result.exit_code == ExitCode.OK, result.stderr
    with psycopg.connect(empty_db_url) as c:
        rows = c.execute(
            "SELECT version, tree_checksum FROM tower_schema_migrations ORDER BY version"
        ).fetchall()
    assert rows == [(int(name[:4]), recorded_tree_checksum(body)) for name, body in bodies.items()]


def ledger_exists(url: str) -> bool:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT to_regclass('tower_schema_migrations') IS NOT NULL").fetchone()
    return bool(row and row[0])


@pytest.mark.timeout(120)
def test_the_ledger_made_while_files_are_checked_is_kept_only_when_the_run_goes_on(
    cli: CLI, empty_db_url: str, tmp_path: Path
) -> None:
    """A fresh database's ledger is made on the server while the client checks the files: a
    refused run leaves no ledger, and so does a run whose lock another runner holds."""
    from towerctl.migrations import LOCK_KEY

    folder = tmp_path / "sql"
    write(folder, "0001_a.sql", "CREATE TABLE a (id int);\n")
    write(folder, "0002_bad.sql", "CREATE TABLE b (id int);\nCOMMIT;\n")
    refused = run(cli, empty_db_url, folder)
    assert refused.exit_code == ExitCode.MIGRATION, refused.stderr
    assert "0002_bad.sql, line 2" in refused.stderr
    assert not ledger_exists(empty_db_url)
    (folder / "0002_bad.sql").unlink()
    with psycopg.connect(direct(empty_db_url), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
        busy = run(cli, empty_db_url, folder, "--lock-timeout", "0")
        assert busy.exit_code == ExitCode.MIGRATION, busy.stderr
        assert "held the lock" in busy.stderr
        assert not ledger_exists(empty_db_url)
    done = run(cli, empty_db_url, folder)
    assert done.exit_code == ExitCode.OK, done.stderr
    assert user_tables(empty_db_url) == {"a"} and ledger_exists(empty_db_url)
