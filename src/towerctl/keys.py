"""The root key ring: the current key that mints, and older keys that still verify.

Keys are hex on one line (at least 32 bytes). The current key comes from
`TOWER_ROOT_KEY`, `TOWER_ROOT_KEY_FILE`, or `$TOWER_HOME/root.key` (created
with mode 0600 on first need). Old keys, for a rotation, come from
`TOWER_OLD_ROOT_KEYS` (comma-separated hex) and `TOWER_OLD_ROOT_KEYS_FILE`
(default `$TOWER_HOME/old-root.keys`, one hex key per line). A key's id is
derived from the key, so tokens name the key that signed them.

Every key file must be the user's own regular file that nobody else may read or
write, or it is refused (exit 2) with one line that never shows the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from towerctl import config
from towerctl.errors import BadInput

MIN_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 64 * 1024  # a key file holds a few hex lines; more is not a key file


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"towerctl key id\x00" + key).hexdigest()[:12]


@dataclass(frozen=True)
class KeyRing:
    current: bytes = field(repr=False)
    old: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def current_id(self) -> str:
        return key_id(self.current)

    def find(self, kid: str) -> bytes | None:
        for key in (self.current, *self.old):
            if key_id(key) == kid:
                return key
        return None


def parse_key(text: str, source: str) -> bytes:
    """Decode a hex key; the message names the source, never the key."""
    cleaned = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]*", cleaned) or len(cleaned) % 2:
        raise BadInput(f"the root key in {source} is not hex on one line")
    key = bytes.fromhex(cleaned)
    if len(key) < MIN_KEY_BYTES:
        raise BadInput(
            f"the root key in {source} is {len(key)} bytes; at least {MIN_KEY_BYTES} are required"
        )
    return key


def _read_private_file(path: Path, what: str) -> str:
    """A key file's text, refused (exit 2) unless it is a regular file of the user's own.

    Ownership and mode are checked on the opened file, so the file read is the one checked.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise BadInput(f"cannot read {what} {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadInput(f"{what} {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise BadInput(
                f"{what} {path} is owned by another user (uid {info.st_uid})",
                hint="a key file must be your own",
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BadInput(
                f"{what} {path} is writable by group or others", hint=f"chmod 600 {path}"
            )
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BadInput(
                f"{what} {path} is readable by group or others", hint=f"chmod 600 {path}"
            )
        try:
            raw = handle.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as error:
            raise BadInput(f"cannot read {what} {path}: {error.strerror}") from None
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise BadInput(f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{what} {path} is not text") from None


def _create_key_file(path: Path) -> None:
    """Write a new key to `path`, 0600 under any umask, never over an existing file.

    The key is written to a fresh private file first and then linked into place,
    so no reader ever sees a half-written key and a key that exists is kept.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def current_key() -> bytes:
    explicit = os.environ.get("TOWER_ROOT_KEY")
    if explicit:
        return parse_key(explicit, "TOWER_ROOT_KEY")
    file_name = os.environ.get("TOWER_ROOT_KEY_FILE")
    if file_name:
        path = Path(file_name)
        return parse_key(_read_private_file(path, "root key file"), str(path))
    path = config.ensure_home() / "root.key"
    if not path.exists() and not path.is_symlink():
        _create_key_file(path)
    return parse_key(_read_private_file(path, "root key file"), str(path))


def old_keys() -> tuple[bytes, ...]:
    keys: list[bytes] = []
    inline = os.environ.get("TOWER_OLD_ROOT_KEYS", "")
    for n, part in enumerate(p for p in inline.split(",") if p.strip()):
        keys.append(parse_key(part, f"TOWER_OLD_ROOT_KEYS (entry {n + 1})"))
    file_name = os.environ.get("TOWER_OLD_ROOT_KEYS_FILE")
    path = Path(file_name) if file_name else config.home() / "old-root.keys"
    if file_name or path.exists():
        text = _read_private_file(path, "old root keys file")
        for n, line in enumerate(text.splitlines()):
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(parse_key(line, f"{path} (line {n + 1})"))
    return tuple(keys)


def load_ring() -> KeyRing:
    return KeyRing(current=current_key(), old=old_keys())
