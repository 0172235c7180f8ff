"""The one place that opens PostgreSQL connections.

Connections are autocommit; callers open `with conn.transaction():` exactly
where atomicity is needed, so nothing idles in a transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerctl.errors import DatabaseUnreachable

if TYPE_CHECKING:
    import psycopg


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
    return text[0] if text else type(error).__name__


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
        )
    except psycopg.Error as error:
        raise DatabaseUnreachable(
            f"cannot connect to the database at {describe(url)}: {first_line(error)}",
            hint="check --database-url / TOWER_DATABASE_URL and that the server is running",
        ) from None
    except Exception as error:  # malformed conninfo raises ProgrammingError et al.
        raise DatabaseUnreachable(
            f"cannot use the database URL: {type(error).__name__}",
            hint="check --database-url / TOWER_DATABASE_URL",
        ) from None
    return conn
