"""Credentials for upstream registries (base images), read from Docker's `config.json`.

The format every container tool reads (docker, podman, skopeo, buildah, crane):
`auths` maps a registry (optionally `registry/namespace`) to `auth` (base64
`user:password`), `username`/`password`, or an `identitytoken` (OAuth2 refresh token);
`credHelpers` maps a registry to a helper NAME, run as `docker-credential-NAME get`
with the server on stdin; `credsStore` is the helper for every other registry.

Which files, in the order podman and skopeo document (containers-auth.json(5)):
- `base_image_auth_file` in condery's configuration: only that file, when set;
- else `$REGISTRY_AUTH_FILE`: only that file, when set;
- else `${XDG_RUNTIME_DIR}/containers/auth.json`, then `$DOCKER_CONFIG/config.json`
  (without DOCKER_CONFIG, `~/.docker/config.json`); the first file with an entry for the
  registry wins.
Within a file: `credHelpers` for the registry, then the most specific `auths` entry
(`host/namespace/repo` before `host`), then `credsStore`.

Files are read at each lookup (lookups happen only when a registry answers 401, at most
once per base resolution), so rotated credentials apply without a restart. Nothing here
puts a secret or a file path into an exception message: they reach clients' error bodies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from condery.common.children import spawn, stop
from condery.common.jsonobject import json_object

MAX_AUTH_FILE_SIZE = 1 << 20
MAX_HELPER_OUTPUT = 1 << 20
HELPER_TIMEOUT = 10.0  # seconds a credential helper may take (a keychain unlock prompt never ends)
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Docker Hub's names for itself: its config.json key is the v1 index URL.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_TOKEN_USERNAME = "<token>"  # a helper's answer whose Secret is an identity token


class RegistryAuthError(RuntimeError):
    """Credentials exist but cannot be read: an unreadable file, a failing helper."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = "the auth file"  # for messages: where they came from, never a path or a value

    def basic(self) -> str:
        """The value of an `Authorization: Basic` header."""
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def normalise_key(key: str) -> str:
    """A config.json key as `host[/path]`: no scheme, no `/v1/`, Docker Hub as one name."""
    text = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", key.strip()).rstrip("/")
    host, _, path = text.partition("/")
    if path in ("v1", "v2"):
        path = ""
    host = host.lower()
    if host in DOCKER_HUB_ALIASES:
        host = "registry-1.docker.io"
    return f"{host}/{path}" if path else host


def _candidates(registry: str, repository: str) -> list[str]:
    """Keys that name `registry/repository`, most specific first."""
    host = normalise_key(registry)
    parts = repository.split("/")
    return [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [host]


def default_auth_files(environ: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The files searched without `base_image_auth_file`, in order (see the module doc)."""
    environ = os.environ if environ is None else environ
    if environ.get("REGISTRY_AUTH_FILE"):
        return (Path(environ["REGISTRY_AUTH_FILE"]),)
    files = []
    if environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    docker_config = environ.get("DOCKER_CONFIG")
    files.append(Path(docker_config) / "config.json" if docker_config
                 else Path(environ.get("HOME") or Path.home()) / ".docker" / "config.json")
    return tuple(files)


class RegistryAuth:
    """Looks up the credentials for one registry (and repository) in auth files.

    `explicit` is a file the operator named (base_image_auth_file): it must be readable.
    Files found by the default search may be missing; one that exists must be readable.
    """

    def __init__(self, files: tuple[Path, ...], *, explicit: bool = False,
                 helper_timeout: float = HELPER_TIMEOUT) -> None:
        self.files = files
        self.explicit = explicit
        self.helper_timeout = helper_timeout

    @classmethod
    def from_setting(cls, auth_file: str | None, environ: Mapping[str, str] | None = None) -> "RegistryAuth":
        if auth_file:
            return cls((Path(auth_file),), explicit=True)
        return cls(default_auth_files(environ))

    async def lookup(self, registry: str, repository: str) -> Credentials | None:
        """The credentials for `registry` (host[:port]) and `repository`, or None."""
        for path in self.files:
            doc = await asyncio.to_thread(self._read, path)
            if doc is None:
                continue
            found = await self._from_document(doc, registry, repository)
            if found is not None:
                return found
        return None

    def _read(self, path: Path) -> dict[str, Any] | None:
        what = "base_image_auth_file" if self.explicit else "a registry auth file"
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_AUTH_FILE_SIZE + 1)
        except FileNotFoundError:
            if self.explicit:
                raise RegistryAuthError(f"{what} does not exist") from None
            return None
        except OSError as exc:
            raise RegistryAuthError(f"cannot read {what}: {exc.strerror}") from None
        if len(data) > MAX_AUTH_FILE_SIZE:
            raise RegistryAuthError(f"{what} is over {MAX_AUTH_FILE_SIZE} bytes")
        doc = json_object(data)
        if doc is None:
            raise RegistryAuthError(f"{what} is not a JSON object (Docker config.json format)")
        return doc

    async def _from_document(self, doc: dict[str, Any], registry: str, repository: str) -> Credentials | None:
        candidates = _candidates(registry, repository)
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            by_key = {normalise_key(k): (k, v) for k, v in helpers.items() if isinstance(k, str)}
            for key in candidates:
                if key in by_key:
                    server, helper = by_key[key]
                    return await self._helper(helper, server)
        auths = doc.get("auths")
        if isinstance(auths, dict):
            by_key = {normalise_key(k): v for k, v in auths.items() if isinstance(k, str)}
            for key in candidates:
                entry = by_key.get(key)
                found = _from_entry(entry) if isinstance(entry, dict) else None
                if found is not None:
                    return found
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            host = normalise_key(registry)
            return await self._helper(store, DOCKER_HUB_SERVER if host == "registry-1.docker.io" else host)
        return None

    async def _helper(self, name: Any, server: str) -> Credentials | None:
        """`docker-credential-NAME get` with `server` on stdin: its JSON answer, or None
        when it has nothing for the server."""
        if not isinstance(name, str) or not _HELPER_NAME.match(name):
            raise RegistryAuthError("a credential helper name in the auth file is not a plain name")
        program = f"docker-credential-{name}"
        try:
            proc = await spawn(
                program, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,  # may echo what it was given; never shown
            )
        except OSError:
            raise RegistryAuthError(f"credential helper {program} is not installed (not on PATH)") from None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(server.encode() + b"\n"), self.helper_timeout)
        except asyncio.TimeoutError:
            raise RegistryAuthError(f"credential helper {program} did not answer within "
                                    f"{self.helper_timeout:g} seconds") from None
        finally:  # a timeout, or the pull that asked cancelled: no helper is left running
            await stop(proc)
        if len(out) > MAX_HELPER_OUTPUT:
            raise RegistryAuthError(f"credential helper {program} answered over {MAX_HELPER_OUTPUT} bytes")
        if proc.returncode != 0:
            # The protocol's "not found" answer; any other failure is the helper's own.
            if b"credentials not found" in out.lower():
                return None
            raise RegistryAuthError(f"credential helper {program} failed (exit status {proc.returncode})")
        answer = json_object(out) or {}
        username = answer.get("Username")
        secret = answer.get("Secret")
        if not isinstance(username, str) or not isinstance(secret, str) or not secret:
            raise RegistryAuthError(f"credential helper {program} answered without Username and Secret")
        source = f"credential helper {program}"
        if username == _TOKEN_USERNAME:
            return Credentials("", "", identity_token=secret, source=source)
        return Credentials(username, secret, source=source)


def _from_entry(entry: dict[str, Any]) -> Credentials | None:
    """An `auths` entry's credentials; None for an empty entry (docker writes `{}` when a
    credsStore holds the secret)."""
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        username = entry.get("username")
        return Credentials(username if isinstance(username, str) else "", "", identity_token=token)
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            username, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, ValueError):
            raise RegistryAuthError("an `auth` value in the auth file is not base64 of user:password") from None
        if not sep:
            raise RegistryAuthError("an `auth` value in the auth file is not base64 of user:password")
        return Credentials(username, password)
    username, password = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password)
    return None
