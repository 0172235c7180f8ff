"""The store as a command sees it: where the database is, a connection for writes,
one for reads, and macaroon grants.

A command builds one `Store` from its options and closes it when done:

    with Store(database_url, read_database_url) as store:
        grant = store.authorize(token, session_id, "read")
        transcripts.export(grant.conn, ...)

- `primary()` connects to the configured database, or starts the embedded
  server when none is configured; every write goes there.
- `reader()` connects to the read replica when one is configured
  (`TOWER_READ_DATABASE_URL` / `--read-database-url`), else it is the primary.
  A replica that lags more than `TOWER_READ_MAX_LAG` seconds is refused with one
  line (exit 8) rather than serving an old page.
- `authorize()` checks a macaroon for one session and scope on the connection
  that will do the work: the replica for `read`, the primary for `request`
  (a revocation reaches a replica once it has been replayed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING
from uuid import UUID

from towerctl import auth, bounds, config, db, embedded, session_ids, sessions
from towerctl.auth import keys
from towerctl.errors import DatabaseUnreachable, Unauthorized

if TYPE_CHECKING:
    import psycopg

    from towerctl.auth.macaroons import TokenInfo
    from towerctl.session_ids import SessionRef

REPLICA_LAG = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_last_wal_receive_lsn() IS NULL
                 OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())
       END"""


@dataclass(frozen=True)
class Grant:
    """What a macaroon allows, with the connection to do it on."""

    conn: psycopg.Connection
    session_id: UUID
    token: TokenInfo


@dataclass
class Store:
    database_url: str | None = None
    read_database_url: str | None = None
    _primary: psycopg.Connection | None = field(default=None, repr=False)
    _reader: psycopg.Connection | None = field(default=None, repr=False)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    # --- connections ----------------------------------------------------------

    def url(self) -> str:
        """The primary's URL: configured, or the embedded server's (started if needed)."""
        url = config.database_url(self.database_url)
        if url:
            return url

        return embedded.ensure_running(config.home()).url

    def primary(self) -> psycopg.Connection:
        if self._primary is None:
            self._primary = db.connect(self.url())
        return self._primary

    def reader(self) -> psycopg.Connection:
        """The read replica when one is configured (checked for lag), else the primary."""
        url = config.read_database_url(self.read_database_url)
        if not url:
            return self.primary()
        if self._reader is None:
            conn = db.connect(url, application_name="towerctl-read")
            try:
                _check_replica(conn, db.describe(url))
            except BaseException:
                conn.close()
                raise
            self._reader = conn
        return self._reader

    def close(self) -> None:
        for conn in (self._reader, self._primary):
            if conn is not None:
                conn.close()
        self._reader = self._primary = None

    # --- grants ---------------------------------------------------------------

    def authorize(self, token: str | None, session_id: SessionRef | UUID, scope: str) -> Grant:
        """The grant for `scope` on one session (exit 3 when the token does not allow it;
        exit 4 when there is no such session). A prefix of the id is resolved against the
        session the token names."""
        conn = self.reader() if scope == "read" else self.primary()
        ring = keys.load_ring()
        resolved = session_ids.resolve_for_token(session_id, token)
        if resolved is None:  # the token's own check says why it is refused
            auth.authorize(conn, ring, token, scope=scope)
            raise Unauthorized("macaroon refused: it names no session")
        session_id = resolved
        info = auth.authorize(conn, ring, token, session_id=str(session_id), scope=scope)
        sessions.get_session(conn, session_id)
        return Grant(conn, session_id, info)


def _check_replica(conn: psycopg.Connection, where: str) -> None:
    row = conn.execute(REPLICA_LAG).fetchone()
    if row is None or not row[0]:
        return  # a primary named as the read database: nothing lags
    lag = float(row[1] or 0)
    limit = bounds.READ_MAX_LAG.value()
    if lag > limit:
        raise DatabaseUnreachable(
            f"the read replica at {where} is {lag:.0f} s behind the primary"
            f" (more than {limit:g} s)",
            hint="retry later, or read from the primary without --read-database-url",
        )
