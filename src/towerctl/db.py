"""The one place that opens PostgreSQL connections.

Connections are autocommit; callers open `with conn.transaction():` exactly
where atomicity is needed, so nothing idles in a transaction.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from towerctl.errors import DatabaseUnreachable, MigrationError, TowerError

if TYPE_CHECKING:
    import psycopg
    from psycopg import Connection as Connection  # for layers above that must not import psycopg


def describe(url: str) -> str:
    """A description of a connection target that is safe to print (no password)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except Exception:
        return "the configured database"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "")
    dbname = str(params.get("dbname") or "")
    where = f"{host}:{port}" if port else host
    return f"{where}/{dbname}" if dbname else where


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else "no detail given"


def classify(error: BaseException) -> TowerError | None:
    """The contract's error for a database failure that is not a bug in towerctl, or None.

    The server went away (no SQLSTATE: the socket was lost; class 08: connection
    exception; 57P: shutdown) is exit 8; a database without towerctl's schema is
    exit 7; a role without the privileges towerctl needs is exit 8 with what to do.
    """
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(error, psycopg.Error):
        return None
    if isinstance(
        error,
        psycopg.errors.UndefinedTable
        | psycopg.errors.UndefinedColumn
        | psycopg.errors.UndefinedFunction,
    ):
        return MigrationError("the database has no towerctl schema (run 'towerctl migrate')")
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return DatabaseUnreachable(
            f"the database role may not do this: {first_line(error)}",
            hint="grant the role towerctl's tables, or connect as their owner",
        )
    if isinstance(error, psycopg.errors.ReadOnlySqlTransaction):
        return DatabaseUnreachable(
            "the database is read-only (a standby?): writes go to the primary",
            hint="point --database-url / TOWER_DATABASE_URL at the primary",
        )
    state = getattr(error, "sqlstate", None)
    if state == "40001" or "conflict with recovery" in first_line(error):
        # A hot standby cancelled the query (or ended the connection) to replay changes
        # the query's snapshot still needed: what was printed is a prefix of the answer.
        return DatabaseUnreachable(
            "the read replica cancelled the read: it conflicted with replaying the "
            "primary's changes (recovery conflict); the output is incomplete",
            hint="retry; or raise max_standby_streaming_delay on the replica, "
            "or read from the primary",
        )
    if isinstance(error, psycopg.OperationalError) and (
        state is None or state.startswith(("08", "57P"))
    ):
        return DatabaseUnreachable(f"lost the database connection: {first_line(error)}")
    return None


def connect(url: str, *, application_name: str = "towerctl") -> psycopg.Connection:
    """Open an autocommit connection, or raise `DatabaseUnreachable` (exit 8)."""
    import logging

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    # psycopg logs some errors it ignores (e.g. ending a pipeline on a lost connection);
    # the error that matters reaches the user as one line, so keep its log off stderr.
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    try:
        conninfo_to_dict(url)
    except Exception:
        # libpq's parse errors quote the offending part, which may be the password.
        raise DatabaseUnreachable(
            "cannot parse the database URL",
            hint="check its syntax; special characters in a password must be percent-encoded",
        ) from None
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=10,
            application_name=application_name,
            # No server-side prepared statements: behind a transaction-pooling
            # PgBouncer the next statement may land on a server connection that
            # never saw the PREPARE (SPEC 13: no session-level features).
            prepare_threshold=None,
        )
    except psycopg.Error as error:
        raise DatabaseUnreachable(
            f"cannot connect to the database at {describe(url)}: {first_line(error)}",
            hint="check --database-url / TOWER_DATABASE_URL and that the server is running",
        ) from None
    except Exception:  # malformed conninfo raises ProgrammingError et al.
        raise DatabaseUnreachable(
            "cannot use the database URL",
            hint="check --database-url / TOWER_DATABASE_URL",
        ) from None
    return conn
