"""Logins: users from an htpasswd file (bcrypt only), groups from a YAML file, robots.

Both files are reread when they change (checked at most once a second, by size, mtime
and inode, so an editor's rename-over counts). At start a bad file is a ConfigError (one
line naming the key, the line and what is wrong); once serving, a bad edit is logged and
the last good content stays in force, so a typo never locks everyone out or in.

Passwords are checked with bcrypt in a small thread pool (off the event loop). A user
that does not exist is checked against a dummy hash of the same cost, so that the time
taken does not tell which names exist. A good (user, password) pair is remembered for a
few minutes as an HMAC under a key of this process, bound to the user's current hash:
clients sending Basic auth on every request pay bcrypt once, and a changed password
ends it at once. Robot tokens are high-entropy and kept as their sha256 only; their
comparison is constant-time (hmac.compare_digest).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Mapping, TypeVar

import bcrypt
import yaml

from condery.auth.rules import Identity
from condery.config.schema import ConfigError, RobotAccount

log = logging.getLogger("condery.auth")

T = TypeVar("T")
_BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# What other htpasswd hash types look like, for the message that refuses them.
_OTHER_HASHES = (("$apr1$", "MD5 ($apr1$)"), ("{SHA}", "SHA-1 ({SHA})"), ("$1$", "MD5-crypt ($1$)"),
                 ("$5$", "SHA-256-crypt ($5$)"), ("$6$", "SHA-512-crypt ($6$)"))
_CHECK_EVERY = 1.0  # seconds between stat()s of a watched file
_GOOD_LOGIN_SECONDS = 300
_GOOD_LOGIN_ENTRIES = 10_000
MAX_NAME = 256  # longer user names are refused before anything else
MAX_PASSWORD = 4096


class ReloadingFile(Generic[T]):
    """A file parsed by `parse`, parsed again whenever it changes on disk."""

    def __init__(self, key: str, path: str, parse: Callable[[str, str], T]) -> None:
        self.key, self.path, self._parse = key, path, parse
        self._lock = threading.Lock()
        self._signature = self._stat()
        self.value = self._read()  # at start: errors stop the server
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def _read(self) -> T:
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{self.key}: cannot read {self.path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{self.key}: {self.path} is not UTF-8 text") from None
        return self._parse(self.key, text)

    def current(self) -> T:
        now = time.monotonic()
        if now - self._checked < _CHECK_EVERY:
            return self.value
        with self._lock:
            if now - self._checked < _CHECK_EVERY:
                return self.value
            self._checked = now
            signature = self._stat()
            if signature != self._signature:
                self._signature = signature
                try:
                    self.value = self._read()
                    log.info("%s reread: %s", self.key, self.path)
                except ConfigError as exc:
                    log.error("%s: keeping the previous content: %s", self.key, exc)
        return self.value


def parse_htpasswd(key: str, text: str) -> dict[str, bytes]:
    """`user:hash` lines (blank lines and `#` comments skipped) -> {user: bcrypt hash}."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, hashed = line.partition(":")
        if not colon or not name or not hashed:
            raise ConfigError(f"{key}: line {number}: expected user:hash (htpasswd -B)")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            kind = next((label for prefix, label in _OTHER_HASHES if hashed.startswith(prefix)), "a non-bcrypt hash")
            raise ConfigError(f"{key}: line {number}: user {name!r} has {kind}; condery takes bcrypt only "
                              "(htpasswd -B)")
        if not _BCRYPT_HASH.fullmatch(hashed):
            raise ConfigError(f"{key}: line {number}: user {name!r} has a malformed bcrypt hash")
        if name in users:
            raise ConfigError(f"{key}: line {number}: user {name!r} is listed twice")
        users[name] = hashed.encode()
    return users


def parse_groups(key: str, text: str) -> dict[str, frozenset[str]]:
    """YAML `{group: [user, ...]}` -> {user: its groups}."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{key}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key}: expected a mapping of group name to a list of user names")
    groups: dict[str, set[str]] = {}
    for group, members in data.items():
        if not isinstance(group, str) or not group.strip():
            raise ConfigError(f"{key}: group {group!r}: expected a name")
        if members is None:
            members = []
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise ConfigError(f"{key}: group {group!r}: expected a list of user names")
        for member in members:
            groups.setdefault(member, set()).add(group)
    return {user: frozenset(names) for user, names in groups.items()}


def _dummy_hash(cost: int) -> bytes:
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=cost))


@dataclass(frozen=True)
class _Login:
    expires: float
    hashed: bytes


class Logins:
    """Users, groups and robots: a user name and a password (or a robot's token) to an identity."""

    def __init__(self, users_file: str | None, groups_file: str | None,
                 robots: Mapping[str, RobotAccount]) -> None:
        self.users = ReloadingFile("auth.users_file", users_file, parse_htpasswd) if users_file else None
        self.groups = ReloadingFile("auth.groups_file", groups_file, parse_groups) if groups_file else None
        self.robots = dict(robots)
        if self.users is not None:
            both = sorted(set(self.users.value) & set(self.robots))
            if both:
                raise ConfigError(f"auth.robots.{both[0]}: a user of auth.users_file has this name too")
        costs = [int(h.split(b"$")[2]) for h in (self.users.value.values() if self.users else ())]
        self._dummy = _dummy_hash(max(costs, default=10))
        self._hmac_key = secrets.token_bytes(32)
        self._good: dict[bytes, _Login] = {}
        # bcrypt holds the GIL only briefly; two threads keep logins from queueing behind
        # one slow hash without letting them take every core from the builds.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="condery-bcrypt")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def groups_of(self, name: str) -> frozenset[str]:
        return self.groups.current().get(name, frozenset()) if self.groups is not None else frozenset()

    def user_fingerprint(self, name: str, kind: str) -> str | None:
        """A short digest of the user's current hash (or robot's token hash): refresh
        tokens carry it, so a changed password or token ends them. None: no such login."""
        if kind == "robot":
            robot = self.robots.get(name)
            material = robot.token_sha256.encode() if robot else None
        else:
            material = self.users.current().get(name) if self.users is not None else None
        return hashlib.sha256(material).hexdigest()[:16] if material is not None else None

    def identity(self, name: str, kind: str) -> Identity:
        groups = self.groups_of(name)
        if kind == "robot" and name in self.robots:
            groups |= frozenset(self.robots[name].groups)
        return Identity(name=name, kind=kind, groups=groups)

    async def check(self, name: str, password: str) -> Identity | None:
        """The identity for these credentials, or None. Constant-time where it matters."""
        if not name or len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
            return None
        robot = self.robots.get(name)
        if robot is not None:
            given = hashlib.sha256(password.encode("utf-8", "surrogateescape")).hexdigest()
            if hmac.compare_digest(given.encode(), robot.token_sha256.encode()):
                return self.identity(name, "robot")
            return None
        hashed = self.users.current().get(name) if self.users is not None else None
        secret = password.encode("utf-8", "surrogateescape")
        marker = hmac.new(self._hmac_key, name.encode("utf-8", "surrogateescape") + b"\0" + secret,
                          hashlib.sha256).digest()
        remembered = self._good.get(marker)
        if remembered is not None and hashed is not None and remembered.expires > time.monotonic() \
                and hmac.compare_digest(remembered.hashed, hashed):
            return self.identity(name, "user")
        ok = await asyncio.get_running_loop().run_in_executor(self._pool, _checkpw, secret, hashed or self._dummy)
        if not ok or hashed is None:
            return None
        if len(self._good) >= _GOOD_LOGIN_ENTRIES:
            self._good.clear()
        self._good[marker] = _Login(time.monotonic() + _GOOD_LOGIN_SECONDS, hashed)
        return self.identity(name, "user")


def _checkpw(password: bytes, hashed: bytes) -> bool:
    # bcrypt looks at 72 bytes at most; bcrypt 5 refuses longer input instead of cutting it.
    try:
        return bcrypt.checkpw(password[:72], hashed)
    except ValueError:
        return False
