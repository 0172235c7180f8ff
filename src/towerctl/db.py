"""The one place that opens PostgreSQL connections.

Connections are autocommit; callers open `with conn.transaction():` exactly
where atomicity is needed, so nothing idles in a transaction.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

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


def safe_url(url: str) -> str:
    """The URL (or libpq string) as a URL without its password, safe to print."""

    from psycopg.conninfo import conninfo_to_dict

    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except Exception:
        return "the configured database (its URL cannot be parsed)"
    params.pop("password", None)
    user = quote(params.pop("user", ""), safe="")
    host = params.pop("host", "")
    port = params.pop("port", "")
    dbname = quote(params.pop("dbname", ""), safe="")
    if host.startswith("/") or "," in host:  # a socket folder or several hosts: a parameter
        params = {"host": host, **({"port": port} if port.strip(",") else {}), **params}
        host = port = ""
    where = f"{user}@" if user else ""
    where += host + (f":{port}" if port else "")
    query = f"?{urlencode(params)}" if params else ""
    return f"postgresql://{where}/{dbname}{query}"


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
    if isinstance(error, psycopg.errors.UndefinedColumn | psycopg.errors.UndefinedFunction):
        # The tables are there (a missing one is UndefinedTable), so the schema was
        # changed outside towerctl, or belongs to another version of it.
        return MigrationError(
            f"the towerctl schema here lacks what this towerctl uses: {first_line(error)}",
            hint="changed by hand or by another version of towerctl: restore what is "
            "missing, or use the towerctl that matches the schema",
        )
    if isinstance(error, psycopg.errors.UndefinedTable):
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
    if isinstance(error, psycopg.errors.QueryCanceled) or state in ("25P03", "25P04"):
        # 57014 statement_timeout or pg_cancel_backend; 25P03/25P04 the idle-in-transaction
        # or transaction timeout ended the connection (a pooler's connection may carry the
        # role's timeouts: towerctl turns them off only on a direct connection).
        return DatabaseUnreachable(
            f"the server cancelled the statement: {first_line(error)}",
            hint="a timeout set for the role or database, or an administrator; retry, "
            "or raise the timeout",
        )
    if isinstance(error, psycopg.OperationalError) and (
        state is None or state.startswith(("08", "57P"))
    ):
        return DatabaseUnreachable(f"lost the database connection: {first_line(error)}")
    return None


# What towerctl's code reads and writes depends on, whatever a server, role, database or
# PGOPTIONS/PGDATESTYLE/PGTZ imposes: dates and intervals in the formats psycopg parses,
# times in UTC. These are reported to the client (GUC_REPORT), so a transaction-pooling
# PgBouncer keeps them per client and sets them on whichever server connection it lends.
PINNED = (("DateStyle", "ISO, MDY"), ("IntervalStyle", "postgres"), ("TimeZone", "UTC"))
# Timeouts that would cancel an export, a migration or a request half-way: off. They are
# not reported, so a pooler cannot keep them per client; they are set only when the
# connection reaches its server directly (the backend's pid is the one the startup
# announced: a pooler announces a key of its own), never leaked into a pooled connection.
TIMEOUTS = ("statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout")
TIMEOUTS_SINCE_17 = ("transaction_timeout",)


def pin_settings(conn: psycopg.Connection) -> None:
    """Set the session settings towerctl depends on (one round trip)."""
    from psycopg import sql

    timeouts = TIMEOUTS + (TIMEOUTS_SINCE_17 if conn.info.server_version >= 170000 else ())
    pinned = [sql.SQL("set_config({}, {}, false)").format(n, v) for n, v in PINNED]
    direct = [sql.SQL("set_config({}, '0', false)").format(n) for n in timeouts]
    query = sql.SQL("SELECT {}, CASE WHEN pg_backend_pid() = {} THEN concat({}) END").format(
        sql.SQL(", ").join(pinned), conn.info.backend_pid, sql.SQL(", ").join(direct)
    )
    conn.execute(query)


# The statement that turns the timeouts off runs under them: a tiny imposed
# statement_timeout cancels it, a tiny transaction_timeout ends the connection, on a
# busy server. Nothing was set then; connect and try again (a server that is really
# gone refuses the new connection at once).
PIN_ATTEMPTS = 20
PIN_RETRIED = ("57014", "25P03", "25P04")  # query_canceled, idle-in-transaction, transaction


def _pin_failed_by_a_timeout(error: BaseException, conn: psycopg.Connection) -> bool:
    """A timeout cancelled the pinning statement, or ended the connection (a FATAL for
    transaction_timeout often reaches libpq only as the connection closed)."""
    return getattr(error, "sqlstate", None) in PIN_RETRIED or "timeout" in str(error) or conn.broken


def _open(url: str, application_name: str) -> psycopg.Connection:
    import psycopg

    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=10,
        application_name=application_name,
        # No server-side prepared statements: behind a transaction-pooling
        # PgBouncer the next statement may land on a server connection that
        # never saw the PREPARE (SPEC 13: no session-level features).
        prepare_threshold=None,
        # Sent at startup (a PgBouncer tracks it), so it wins over PGCLIENTENCODING,
        # PGOPTIONS and ALTER ROLE/DATABASE SET: towerctl's text is UTF-8 end to end.
        client_encoding="UTF8",
    )


def connect(url: str, *, application_name: str = "towerctl") -> psycopg.Connection:
    """Open an autocommit connection, or raise `DatabaseUnreachable` (exit 8)."""

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
        conn = _open(url, application_name)
        for attempt in range(PIN_ATTEMPTS):
            try:
                pin_settings(conn)
                break
            except psycopg.Error as error:
                retry = _pin_failed_by_a_timeout(error, conn)
                conn.close()
                if attempt == PIN_ATTEMPTS - 1 or not retry:
                    raise
                time.sleep(0.001 * attempt)  # let the server's other work pass
                conn = _open(url, application_name)
            except BaseException:
                conn.close()
                raise
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
