"""Shell completion's look-ups in the store: fast, bounded and silent on failure.

Completion runs on every <TAB>: it never starts the embedded server, waits at
most about a second, and answers nothing rather than an error.
"""

from __future__ import annotations

from towerctl import config, embedded

MAX_CANDIDATES = 50
SESSION_IDS = """
SELECT id::text FROM sessions WHERE id::text LIKE %s
ORDER BY created_at DESC LIMIT %s"""


def session_ids(prefix: str, database_url: str | None = None) -> list[str]:
    """Ids of recent sessions starting with `prefix`; [] when the store is not at hand."""
    try:
        url = config.database_url(database_url) or _running_embedded_url()
        if url is None:
            return []
        import psycopg

        with psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=1,
            client_encoding="UTF8",
            options="-c statement_timeout=500",
        ) as conn:
            like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            rows = conn.execute(SESSION_IDS, (like, MAX_CANDIDATES)).fetchall()
        return [str(r[0]) for r in rows]
    except Exception:  # completion must never print a traceback into a shell prompt
        return []


def _running_embedded_url() -> str | None:
    info = embedded.read_running(embedded.pgdata_path(config.home()))
    return info.url if info is not None and info.status == "ready" else None
