from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from towerctl.sqlsplit import UnterminatedSQL, split_statements


def texts(script: str) -> list[str]:
    return [s.text for s in split_statements(script)]


def test_plain_statements_and_lines() -> None:
    got = split_statements("SELECT 1;\n\nSELECT\n 2;\n")
    assert [(s.text, s.line) for s in got] == [("SELECT 1", 1), ("SELECT\n 2", 3)]


def test_semicolons_inside_quotes_comments_and_bodies_do_not_split() -> None:
    script = """
    -- a comment; with a semicolon
    INSERT INTO t VALUES ('a;b', 'it''s; fine', E'x\\';y');
    /* block ; /* nested ; */ still comment ; */
    SELECT "odd;name" FROM t;
    CREATE FUNCTION f() RETURNS int AS $$ BEGIN RETURN 1; END; $$ LANGUAGE plpgsql;
    DO $body$ BEGIN PERFORM 1; END $body$;
    """
    got = texts(script)
    assert len(got) == 4
    assert got[0].startswith("INSERT") and got[0].endswith("E'x\\';y')")
    assert got[2].startswith("CREATE FUNCTION") and got[2].endswith("plpgsql")


def test_trailing_statement_without_semicolon() -> None:
    assert texts("SELECT 1; SELECT 2") == ["SELECT 1", "SELECT 2"]


def test_line_of_position() -> None:
    [stmt] = split_statements("\n\nSELECT\n  nope\nFROM t;")
    assert stmt.line == 3
    assert stmt.line_of(stmt.text.index("nope") + 1) == 4


@pytest.mark.parametrize("script", ["SELECT 'abc", "SELECT $$ x", "/* open", 'SELECT "x'])
def test_unterminated_parts_are_reported(script: str) -> None:
    with pytest.raises(UnterminatedSQL):
        split_statements(script)


@given(st.text())
def test_never_crashes_on_arbitrary_text(script: str) -> None:
    try:
        statements = split_statements(script)
    except UnterminatedSQL:
        return
    for statement in statements:
        assert statement.text.strip()
        assert statement.line >= 1
