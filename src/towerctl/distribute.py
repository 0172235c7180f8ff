"""`towerctl db distribute`: lay a migrated store out over a Citus cluster, by session.

The plan is read from the catalog, so a table a later migration adds is planned by
the same rules (on a distributed store `migrate` applies it after each file; the
command is idempotent):

- `sessions` is distributed by `id`, and every table whose primary key starts with
  `session_id` by `session_id`, colocated with `sessions`: all of one session's rows
  live on one node;
- the migration ledger (`tower_schema_*`) stays on the coordinator, where `migrate`
  runs (a ledger made a reference table is taken back: `migrate` cannot write one);
  every other table without a session becomes a reference table (a copy on every
  node: revoked tokens, the doctor's watermarks);
- the session functions (`towerctl_take_request`, `towerctl_write_request`, ...)
  stay on the coordinator, each of their statements sent to the node that holds the
  session: every row gets its id from the coordinator's one sequence, so ids keep the
  order of their writes through a shard move (`citus_move_shard_placement`), and the
  order of a transcript, its cursors, `--last`, the context window and `--follow`
  (which listens on the coordinator, where the write notifies it) stay right;
  functions run on the workers would take ids from each worker's own range;
- the trigger that notifies `session messages --follow` of new messages is dropped
  first: a distributed table cannot keep it (its NOTIFY would run on a worker, inside
  a two-phase commit, which PostgreSQL refuses); the request's write notifies instead.

Each step runs in its own statement, in the order above; a step already in place is
reported as such and skipped, so an interrupted run is finished by running it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from towerctl.errors import BadInput, MigrationError

if TYPE_CHECKING:
    import psycopg

ANCHOR = "sessions"
SESSION_COLUMN = "session_id"
COORDINATOR_PREFIX = "tower_schema_"
NOTIFY_TRIGGERS = {("session_messages", "session_messages_notify")}

# Every table, and whether it is per-session: its primary key starts with session_id.
TABLES = """
SELECT c.relname,
       coalesce((SELECT a.attname = %(column)s
                 FROM pg_index i JOIN pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = c.oid AND i.indisprimary), false)
FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
  AND NOT c.relispartition
ORDER BY c.relname
"""
TRIGGERS = """
SELECT c.relname, t.tgname
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = current_schema()::regnamespace AND NOT t.tgisinternal
ORDER BY 1, 2
"""
# Which table's foreign keys reference which (a referenced table is distributed first).
REFERENCES = """
SELECT c.conrelid::regclass::text, c.confrelid::regclass::text
FROM pg_constraint c
WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace
  AND c.conrelid <> c.confrelid
"""
CITUS = "SELECT extversion FROM pg_extension WHERE extname = 'citus'"
# What is in place already (only asked where Citus is installed).
PLACED_TABLES = """
SELECT logicalrelid::regclass::text, partmethod FROM pg_dist_partition
"""


@dataclass(frozen=True)
class Step:
    action: str  # drop-trigger, distribute, reference, keep
    target: str
    detail: str
    sql: str
    params: tuple[str, ...]
    done: bool


@dataclass(frozen=True)
class Plan:
    citus: str | None  # the extension's version, None where Citus is not installed
    steps: list[Step]


def plan(conn: psycopg.Connection) -> Plan:
    """The steps that lay this store out over Citus, each marked done when in place."""
    tables: dict[str, bool] = dict(conn.execute(TABLES, {"column": SESSION_COLUMN}).fetchall())
    if ANCHOR not in tables:
        raise MigrationError("the database has no towerctl schema (run 'towerctl migrate')")
    row = conn.execute(CITUS).fetchone()
    citus = str(row[0]) if row else None
    placed: dict[str, str] = {}
    if citus is not None:
        placed = dict(conn.execute(PLACED_TABLES).fetchall())
    steps = [
        _trigger_step(table, trigger)
        for table, trigger in conn.execute(TRIGGERS).fetchall()
        if tables.get(table) or table == ANCHOR
    ]
    steps.append(_distribute(ANCHOR, "id", None, placed))
    references: dict[str, set[str]] = {}
    for table, referenced in conn.execute(REFERENCES).fetchall():
        references.setdefault(table, set()).add(referenced)
    per_session = [t for t, has in tables.items() if has and t != ANCHOR]
    steps += [_distribute(t, SESSION_COLUMN, ANCHOR, placed) for t in _referenced_first(
        per_session, references)]  # fmt: skip
    for table in (t for t, has in tables.items() if not has and t != ANCHOR):
        if table.startswith(COORDINATOR_PREFIX):
            # A ledger made a reference table (an older recipe did) is taken back.
            detail = "on the coordinator (the migration ledger)"
            sql = "SELECT undistribute_table(%s)"
            steps.append(Step("keep", table, detail, sql, (table,), table not in placed))
        else:
            sql = "SELECT create_reference_table(%s)"
            done = placed.get(table) == "n"
            steps.append(Step("reference", table, "a copy on every node", sql, (table,), done))
    return Plan(citus, steps)


def _distribute(table: str, column: str, colocate: str | None, placed: dict[str, str]) -> Step:
    done = placed.get(table) == "h"
    if colocate is None:
        sql = "SELECT create_distributed_table(%s, %s)"
        return Step("distribute", table, f"by {column}", sql, (table, column), done)
    sql = "SELECT create_distributed_table(%s, %s, colocate_with => %s)"
    detail = f"by {column}, colocated with {colocate}"
    return Step("distribute", table, detail, sql, (table, column, colocate), done)


def _referenced_first(tables: list[str], references: dict[str, set[str]]) -> list[str]:
    """`tables` (sorted by name) so that a table comes after those its foreign keys
    reference; a cycle keeps the remaining tables in name order."""
    ordered: list[str] = []
    left = sorted(tables)
    while left:
        ready = [t for t in left if not (references.get(t, set()) & set(left) - {t})]
        chosen = ready[0] if ready else left[0]
        ordered.append(chosen)
        left.remove(chosen)
    return ordered


def _trigger_step(table: str, trigger: str) -> Step:
    if (table, trigger) not in NOTIFY_TRIGGERS:
        raise BadInput(
            f"{table} has the trigger {trigger}, which a distributed table cannot keep",
            hint="drop it (or move its work elsewhere), then run db distribute again",
        )
    detail = "a distributed table cannot keep it (the request's write notifies followers)"
    # Only the known trigger of a known table is dropped: names are towerctl's own.
    sql = f"DROP TRIGGER IF EXISTS {trigger} ON {table}"
    return Step("drop-trigger", f"{trigger} on {table}", detail, sql, (), False)


def distributed(conn: psycopg.Connection, table: str) -> bool:
    """Whether `table` is a distributed table of a Citus cluster (not merely present)."""
    if conn.execute(CITUS).fetchone() is None:
        return False
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_dist_partition"
        " WHERE logicalrelid = to_regclass(%s) AND partmethod = 'h')",
        (table,),
    ).fetchone()
    return bool(row and row[0])


def apply(conn: psycopg.Connection, the_plan: Plan) -> list[Step]:
    """Run every step not in place yet, in order; the steps run."""
    if the_plan.citus is None:
        raise BadInput(
            "Citus is not installed in this database: db distribute lays a store out "
            "over a Citus coordinator",
            hint="CREATE EXTENSION citus on the coordinator first; --dry-run shows the plan",
        )
    ran = []
    for step in the_plan.steps:
        if step.done:
            continue
        with conn.transaction():
            # Citus runs DDL over the shards of several tables one connection at a time
            # when asked; in parallel it refuses DDL after an earlier parallel step.
            conn.execute("SET LOCAL citus.multi_shard_modify_mode = 'sequential'")
            conn.execute(step.sql, step.params or None)
        ran.append(step)
    return ran
