"""`towerctl db distribute` on plain PostgreSQL: the plan covers every table the schema
classifier knows, in an order Citus accepts; without Citus only --dry-run answers.

The run on a Citus cluster itself is in docs/scaling.md (Citus builds only by hand)."""

from __future__ import annotations

import json

import psycopg

from conftest import CLI
from migrations.test_schema_keys import PER_SESSION, SESSION_LESS
from towerctl.errors import ExitCode


def planned(cli: CLI) -> list[dict[str, str]]:
    result = cli("db", "distribute", "--dry-run", "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert "Citus is not installed" in result.stderr
    doc = json.loads(result.stdout)
    assert doc["citus"] is None and doc["dryRun"] is True
    steps: list[dict[str, str]] = doc["steps"]
    return steps


def test_the_plan_places_every_table_the_classifier_knows(cli: CLI) -> None:
    steps = planned(cli)
    by_action: dict[str, set[str]] = {}
    for step in steps:
        by_action.setdefault(step["action"], set()).add(step["object"].split("(")[0])
    assert by_action["distribute"] == PER_SESSION | {"sessions"}
    assert by_action["reference"] | by_action["keep"] == SESSION_LESS - {"sessions"}
    assert by_action["keep"] == {t for t in SESSION_LESS if t.startswith("tower_schema_")}
    assert set(by_action) == {"drop-trigger", "distribute", "reference", "keep"}  # no function
    assert by_action["drop-trigger"] == {"session_messages_notify on session_messages"}
    assert all(step["state"] == "planned" for step in steps if step["action"] != "keep")
    details = {s["object"]: s["detail"] for s in steps if s["action"] == "distribute"}
    assert details["sessions"] == "by id"
    assert {details[t] for t in PER_SESSION} == {"by session_id, colocated with sessions"}


def test_a_table_comes_after_the_tables_it_references(cli: CLI, conn: psycopg.Connection) -> None:
    order = [s["object"] for s in planned(cli) if s["action"] in ("drop-trigger", "distribute")]
    assert order[0].startswith("session_messages_notify")  # before its table is distributed
    assert order[1] == "sessions"
    references = conn.execute(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint"
        " WHERE contype = 'f' AND conrelid <> confrelid"
    ).fetchall()
    assert references  # the order is checked against real foreign keys
    for table, referenced in references:
        if table in order and referenced in order:
            assert order.index(referenced) < order.index(table), (table, referenced)


def test_a_per_session_table_added_later_is_planned_too(cli: CLI, conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE TABLE session_notes (session_id uuid NOT NULL REFERENCES sessions (id),"
        " id bigint GENERATED ALWAYS AS IDENTITY, note text, PRIMARY KEY (session_id, id))"
    )
    conn.execute("CREATE TABLE price_list (agent text PRIMARY KEY, sats bigint)")
    steps = {s["object"]: (s["action"], s["detail"]) for s in planned(cli)}
    assert steps["session_notes"] == ("distribute", "by session_id, colocated with sessions")
    assert steps["price_list"] == ("reference", "a copy on every node")


def test_without_citus_it_changes_nothing_and_exits_2(cli: CLI, conn: psycopg.Connection) -> None:
    result = cli("db", "distribute")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stdout == ""
    assert result.stderr.count("\n") <= 2 and "Citus is not installed" in result.stderr
    trigger = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'session_messages_notify'"
    ).fetchone()
    assert trigger == (1,)


def test_a_trigger_it_does_not_know_is_refused_by_name(cli: CLI, conn: psycopg.Connection) -> None:
    conn.execute(
        "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$"
    )
    conn.execute(
        "CREATE TRIGGER balance_audit AFTER INSERT ON balance_ledger"
        " FOR EACH ROW EXECUTE FUNCTION audit()"
    )
    result = cli("db", "distribute", "--dry-run")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "balance_ledger has the trigger balance_audit" in result.stderr
    assert result.stdout == ""


def test_an_unmigrated_database_is_a_migration_problem(cli: CLI, empty_db_url: str) -> None:
    result = cli("--database-url", empty_db_url, "db", "distribute", "--dry-run")
    assert result.exit_code == ExitCode.MIGRATION
    assert "no towerctl schema" in result.stderr
