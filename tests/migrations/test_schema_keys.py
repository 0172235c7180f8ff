"""SPEC 10: every per-session table is keyed by session_id (ready for Citus)."""

from __future__ import annotations

import psycopg
import psycopg.sql

PER_SESSION = {"session_requests", "balance_ledger", "session_messages", "session_history_clears"}
SESSION_LESS = {
    "tower_schema_migrations",
    "tower_schema_migration_lease",  # one row while a no-transaction file runs
    "tower_schema_migration_repairs",
    "macaroon_revocations",
    "doctor_watermarks",  # one row per table: what doctor's last clean run saw
    "sessions",
}


def constraints(conn: psycopg.Connection) -> list[tuple[str, str, str, list[str], list[str]]]:
    """(table, constraint, type, its columns, referenced columns) for p/u/f constraints."""
    rows = conn.execute(
        """
        SELECT rel.relname, con.conname, con.contype,
               ARRAY(SELECT a.attname FROM unnest(con.conkey) k
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k),
               ARRAY(SELECT a.attname FROM unnest(con.confkey) k
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k)
        FROM pg_constraint con
        JOIN pg_class rel ON rel.oid = con.conrelid
        JOIN pg_namespace ns ON ns.oid = rel.relnamespace
        WHERE ns.nspname = current_schema() AND con.contype IN ('p', 'u', 'f')
        """
    ).fetchall()
    return [(r[0], r[1], r[2], list(r[3]), list(r[4])) for r in rows]


def unique_indexes(conn: psycopg.Connection) -> list[tuple[str, str, list[str]]]:
    rows = conn.execute(
        """
        SELECT t.relname, i.relname,
               ARRAY(SELECT a.attname FROM unnest(ix.indkey) k
                     JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k)
        FROM pg_index ix
        JOIN pg_class t ON t.oid = ix.indrelid
        JOIN pg_class i ON i.oid = ix.indexrelid
        JOIN pg_namespace ns ON ns.oid = t.relnamespace
        WHERE ns.nspname = current_schema() AND ix.indisunique
        """
    ).fetchall()
    return [(r[0], r[1], list(r[2])) for r in rows]


def test_every_table_is_classified(conn: psycopg.Connection) -> None:
    names = {
        r[0]
        for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    assert names == PER_SESSION | SESSION_LESS, "classify new tables in this test"


def test_per_session_keys_include_session_id(conn: psycopg.Connection) -> None:
    faults = []
    for table, name, kind, columns, referenced in constraints(conn):
        if table not in PER_SESSION:
            continue
        if "session_id" not in columns:
            faults.append(f"{table}.{name} ({kind}) lacks session_id")
        if kind == "f" and columns[0] != "session_id":
            faults.append(f"{table}.{name} must start with session_id")
        if kind == "f" and referenced != ["id"] and "session_id" not in referenced:
            faults.append(f"{table}.{name} references a table without session_id")
    for table, index, columns in unique_indexes(conn):
        if table in PER_SESSION and "session_id" not in columns:
            faults.append(f"unique index {index} on {table} lacks session_id")
    assert faults == []


def test_every_per_session_table_has_a_primary_key_starting_with_session_id(
    conn: psycopg.Connection,
) -> None:
    pkeys = {t: cols for t, _, kind, cols, _ in constraints(conn) if kind == "p"}
    for table in PER_SESSION:
        assert pkeys[table][0] == "session_id", table
    assert pkeys["sessions"] == ["id"]


def test_a_fresh_stores_foreign_key_checks_use_the_request_key(conn: psycopg.Connection) -> None:
    """0013/0014: with no statistics yet (a new store), the foreign-key checks of a request's
    debit and messages look the request up by its primary key; an index also led by
    session_id (0004's idempotency constraint) had them read every earlier request."""
    row = conn.execute(
        "INSERT INTO sessions (state, balance_sats) VALUES ('active', 1000) RETURNING id"
    ).fetchone()
    assert row is not None
    sid = row[0]
    for _ in range(20):
        conn.execute(
            "INSERT INTO session_requests (session_id, state, agent, input_tokens,"
            " output_tokens, cost_sats, debited_sats, balance_after_sats)"
            " VALUES (%s, 'complete', 'echo', 1, 1, 0, 0, 1000)",
            (sid,),
        )
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute(
        "PREPARE fk_check (uuid, bigint) AS SELECT 1 FROM ONLY session_requests x"
        " WHERE session_id = $1 AND id = $2 FOR KEY SHARE OF x"
    )
    explain = psycopg.sql.SQL("EXPLAIN EXECUTE fk_check ({}, 1)").format(str(sid))
    plan = "\n".join(line for (line,) in conn.execute(explain).fetchall())
    assert "session_requests_pkey" in plan, plan
