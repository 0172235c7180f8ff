"""The root key ring: the current key that mints, and older keys that still verify.

Keys are hex on one line (at least 32 bytes). The current key comes from
`TOWER_ROOT_KEY`, `TOWER_ROOT_KEY_FILE`, or `$TOWER_HOME/root.key` (created
with mode 0600 by the first command that mints; commands that only read or
verify never create a key). `rotate()` makes a new current key in the home and
keeps the old one for verifying. Old keys, for a rotation, come from
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
from towerctl.errors import BadInput, NotFound, Unauthorized

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

    def known(self) -> tuple[bytes, ...]:
        return (self.current, *self.old)

    def find(self, kid: str) -> bytes | None:
        for key in self.known():
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


def _write_new_key(temp: Path) -> None:
    """A new random key in a fresh private file (0600 under any umask), on disk."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _create_key_file(path: Path) -> None:
    """Write a new key to `path`, never over an existing file.

    The key is written to a fresh private file first and then linked into place,
    so no reader ever sees a half-written key and a key that exists is kept.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
    try:
        _write_new_key(temp)
        with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
            os.link(temp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def home_key_path() -> Path:
    return config.home() / "root.key"


def old_keys_path() -> Path:
    explicit = os.environ.get("TOWER_OLD_ROOT_KEYS_FILE")
    return Path(explicit) if explicit else config.home() / "old-root.keys"


def key_source() -> str:
    """Where the current key comes from, for people: a variable's name or a file's path."""
    if os.environ.get("TOWER_ROOT_KEY"):
        return "TOWER_ROOT_KEY"
    return os.environ.get("TOWER_ROOT_KEY_FILE") or str(home_key_path())


def current_key(*, create: bool = False) -> bytes:
    """The key that mints. `create`: make `$TOWER_HOME/root.key` when there is none (only
    commands that mint ask); otherwise a missing key is refused, saying where to point."""
    explicit = os.environ.get("TOWER_ROOT_KEY")
    if explicit:
        return parse_key(explicit, "TOWER_ROOT_KEY")
    file_name = os.environ.get("TOWER_ROOT_KEY_FILE")
    if file_name:
        path = Path(file_name)
        return parse_key(_read_private_file(path, "root key file"), str(path))
    path = home_key_path()
    if not path.exists() and not path.is_symlink():
        if not create:
            raise Unauthorized(
                f"no root key: {path} does not exist",
                hint="set TOWER_ROOT_KEY_FILE or TOWER_ROOT_KEY to the key that minted the "
                "token; only commands that mint create a key",
            )
        config.ensure_home()
        _create_key_file(path)
    else:
        config.ensure_home()
    return parse_key(_read_private_file(path, "root key file"), str(path))


def old_keys() -> tuple[bytes, ...]:
    keys: list[bytes] = []
    inline = os.environ.get("TOWER_OLD_ROOT_KEYS", "")
    for n, part in enumerate(p for p in inline.split(",") if p.strip()):
        keys.append(parse_key(part, f"TOWER_OLD_ROOT_KEYS (entry {n + 1})"))
    path = old_keys_path()
    if os.environ.get("TOWER_OLD_ROOT_KEYS_FILE") or path.exists():
        text = _read_private_file(path, "old root keys file")
        for n, line in enumerate(text.splitlines()):
            if line.strip() and not line.lstrip().startswith("#"):
                keys.append(parse_key(line, f"{path} (line {n + 1})"))
    return tuple(keys)


def load_ring(*, create: bool = False) -> KeyRing:
    """The ring for verifying (`create`: for minting, making the home's key if needed)."""
    return KeyRing(current=current_key(create=create), old=old_keys())


def current_key_id() -> str:
    """The current key's id; NotFound (exit 4) when there is no key yet."""
    try:
        return key_id(current_key())
    except Unauthorized:
        raise NotFound(
            f"no root key yet: {home_key_path()} is created by the first command that mints"
            " (session open, macaroon mint)"
        ) from None


def rotate() -> tuple[str, str]:
    """A new current key in `$TOWER_HOME/root.key`; the old one is appended to the old keys
    file (0600) first, so tokens it signed keep verifying whatever happens in between.
    Returns (old key id, new key id). Refused (exit 2) when the key is set elsewhere."""
    if os.environ.get("TOWER_ROOT_KEY") or os.environ.get("TOWER_ROOT_KEY_FILE"):
        raise BadInput(
            f"the root key comes from {key_source()}: rotate it where it is kept",
            hint="put the old key in TOWER_OLD_ROOT_KEYS_FILE so its tokens keep verifying",
        )
    home = config.ensure_home()
    with config.exclusive_lock(home, os.O_RDONLY | os.O_DIRECTORY):  # one rotation at a time
        old = current_key(create=True)
        old_keys()  # an old keys file that would be refused is refused before any change
        _append_private(old_keys_path(), old.hex() + "\n")
        path = home_key_path()
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.new")
        try:
            _write_new_key(temp)
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        _fsync_folder(home)
        return key_id(old), key_id(current_key())


def _append_private(path: Path, line: str) -> None:
    """Append to a key file of the user's own, created 0600 under any umask."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a") as handle:
        os.fchmod(fd, 0o600)
        handle.write(line)
        handle.flush()
        os.fsync(fd)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
