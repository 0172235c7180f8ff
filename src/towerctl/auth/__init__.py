"""Who may do what: the root keys (`keys`), the macaroons they sign (`macaroons`) and the
check a command makes before it touches a session (`grants`)."""

from towerctl.auth.grants import authorize, revoke

__all__ = ["authorize", "revoke"]
