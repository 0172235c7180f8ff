"""The embedded PostgreSQL server: starting, finding and stopping it (`server`), and the
account, folders and binaries it runs with (`account`)."""

from towerctl.embedded.account import (
    MAX_SOCKET_PATH_BYTES,
    PORT,
    SERVER_DATA_ROOT,
    SERVER_USER,
    ServerUser,
    pgdata_path,
    server_installation,
    server_user,
    wheel_installation,
)
from towerctl.embedded.server import ServerInfo, ensure_running, read_running, remove, stop

__all__ = [
    "MAX_SOCKET_PATH_BYTES",
    "PORT",
    "SERVER_DATA_ROOT",
    "SERVER_USER",
    "ServerInfo",
    "ServerUser",
    "ensure_running",
    "pgdata_path",
    "read_running",
    "remove",
    "server_installation",
    "server_user",
    "stop",
    "wheel_installation",
]
