"""A pull-only client of the OCI distribution protocol, for fetching base images.

The upstream is treated as hostile: every manifest and blob is checked against the
digest we asked for, sizes are bounded, and a blob reaches the caller only as a local
file whose sha256 and size already matched.

When the registry answers 401, its challenge says how to authenticate: `Basic` gets the
registry's credentials (auth.py) directly; `Bearer` gets a token from the realm
it names, asked for with those credentials (Basic, or an OAuth2 refresh-token POST for an
identity token) or anonymously when there are none. Credentials go only to the registry
they are for and to the token realm it names (https, or loopback for a loopback
registry); aiohttp drops the Authorization header when a blob GET is redirected to
another origin (S3, a CDN). No message holds a credential.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

import aiohttp

from condery.bases.auth import Credentials, RegistryAuth, RegistryAuthError
from condery.common.jsonobject import json_object
from condery.oci.grammar import REPOSITORY_RE, is_digest, is_tag
from condery.oci.manifest import MAX_MANIFEST_SIZE, FetchedManifest
from condery.oci.media_types import INDEX_TYPES, MANIFEST_TYPES

MANIFEST_ACCEPT = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MAX_TOKEN_SIZE = 1 << 20
_CHUNK = 1 << 20
_FLUSH = 8 << 20  # bytes gathered before one hand-off to the writer thread

_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_CHALLENGE_PARAM_RE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


class UpstreamError(RuntimeError):
    """The upstream registry failed, refused, or sent something that does not verify."""


@dataclass(frozen=True)
class ImageReference:
    """REGISTRY/REPOSITORY[:TAG][@DIGEST], normalised the way Docker does."""

    registry: str  # host[:port] actually contacted (docker.io -> registry-1.docker.io)
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, text: str) -> "ImageReference":
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not is_digest(digest):
                # Not echoed: "user:password@host/repo" lands here, and a reference
                # has no place for credentials.
                raise ValueError("what follows '@' is not a sha256 digest (credentials are not supported)")
        tag = None
        last_slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > last_slash:  # a colon after the last slash is a tag, not a port
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not is_tag(tag):
                raise ValueError(f"invalid tag {tag!r}")
        first, _, remainder = rest.partition("/")
        # Docker's rule: the first component is a registry if it looks like a host.
        if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, repository = first, remainder
        else:
            registry, repository = "docker.io", rest
        if not _HOST_RE.match(registry):
            raise ValueError(f"invalid registry host {registry!r}")
        if registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
            registry = "registry-1.docker.io"
            if "/" not in repository:
                repository = "library/" + repository
        if not REPOSITORY_RE.fullmatch(repository) or len(repository) > 255:
            raise ValueError(f"invalid repository name {repository!r}")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, repository, tag, digest)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_loopback_host(host: str) -> bool:
    """Loopback hosts (127.0.0.0/8, localhost, ::1) speak plain HTTP; all others HTTPS."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def base_url(registry: str) -> str:
    return ("http" if is_loopback_host(registry) else "https") + f"://{registry}"


def parse_bearer_challenge(header: str) -> dict[str, str]:
    """The parameters of a `WWW-Authenticate: Bearer realm=..,service=..,scope=..` header."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise UpstreamError(
            f"upstream asks for {scheme or 'unknown'} authentication; only Basic and Bearer are supported"
        )
    values = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM_RE.finditer(params)}
    if "realm" not in values:
        raise UpstreamError("upstream bearer challenge has no realm")
    return values


class UpstreamClient:
    """Pulls manifests and blobs from registries, authenticating per repository."""

    def __init__(self, session: aiohttp.ClientSession, *, auth: RegistryAuth | None = None,
                 read_timeout: float = 60.0) -> None:
        self._session = session
        self._auth = auth
        self._authorization: dict[tuple[str, str], str] = {}  # (registry, repo) -> Authorization value
        self._credentials: dict[tuple[str, str], Credentials | None] = {}  # looked up once per client
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout)

    async def _lookup(self, ref: ImageReference) -> Credentials | None:
        key = (ref.registry, ref.repository)
        if key not in self._credentials:
            try:
                self._credentials[key] = await self._auth.lookup(*key) if self._auth else None
            except RegistryAuthError as exc:
                raise UpstreamError(f"{ref.registry}: {exc}") from None
        return self._credentials[key]

    async def _authorize(self, ref: ImageReference, challenge: str) -> str:
        """The Authorization header value that answers a 401's challenge."""
        scheme = challenge.strip().partition(" ")[0].lower()
        credentials = await self._lookup(ref)
        if scheme == "basic":
            if credentials is None:
                raise UpstreamError(f"unauthorized: {ref.registry} asks for a user name and password "
                                    "and none is configured for it (see base_image_auth_file)")
            if credentials.identity_token is not None:
                raise UpstreamError(f"unauthorized: {ref.registry} asks for a password; "
                                    f"{credentials.source} has only an identity token for it")
            return credentials.basic()
        return "Bearer " + await self._token(ref, challenge, credentials)

    async def _token(self, ref: ImageReference, challenge: str, credentials: Credentials | None) -> str:
        params = parse_bearer_challenge(challenge)
        realm = params["realm"]
        parts = urlsplit(realm)
        # A registry chooses where our token request goes: keep it to https, or to
        # loopback when the registry itself is on loopback (tests, local mirrors).
        if parts.scheme != "https" and not (
            parts.scheme == "http" and is_loopback_host(parts.netloc) and is_loopback_host(ref.registry)
        ):
            raise UpstreamError(f"refusing token realm {_origin(realm)}: not https")
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        try:
            if credentials is not None and credentials.identity_token is not None:
                # OAuth2 refresh-token grant, as docker does with an identity token.
                form = {"grant_type": "refresh_token", "refresh_token": credentials.identity_token,
                        "client_id": "condery", **query}
                request = self._session.post(realm, data=form, timeout=self._timeout)
            else:
                headers = {"Authorization": credentials.basic()} if credentials is not None else {}
                request = self._session.get(realm, params=query, headers=headers, timeout=self._timeout)
            async with request as resp:
                if resp.status in (401, 403) and credentials is not None:
                    raise UpstreamError(f"unauthorized: the token server for {ref.registry} refused the "
                                        f"credentials from {credentials.source} (HTTP {resp.status})")
                if resp.status != 200:
                    raise UpstreamError(f"token server {_origin(realm)} answered {resp.status}")
                body = await _read_limited(resp, MAX_TOKEN_SIZE, "token response")
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"token server {_origin(realm)}: {exc}") from exc
        doc = json_object(body) or {}
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n "):
            raise UpstreamError("token server sent no usable token")
        return token

    async def _get(self, ref: ImageReference, path: str, headers: Mapping[str, str]) -> aiohttp.ClientResponse:
        """GET with one authenticated retry; the caller must release the response."""
        url = f"{base_url(ref.registry)}/v2/{ref.repository}/{path}"
        key = (ref.registry, ref.repository)
        for attempt in range(2):
            request_headers = dict(headers)
            if key in self._authorization:
                request_headers["Authorization"] = self._authorization[key]
            try:
                resp = await self._session.get(url, headers=request_headers, timeout=self._timeout)
            except aiohttp.ClientError as exc:
                raise UpstreamError(f"{ref.registry}: {exc}") from exc
            if resp.status == 401 and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                self._authorization[key] = await self._authorize(ref, challenge)
                continue
            if resp.status in (401, 403):
                resp.release()
                raise UpstreamError(self._refusal(ref, resp.status))
            if resp.status != 200:
                resp.release()
                raise UpstreamError(f"{ref.registry}/{ref.repository}: GET {path} answered {resp.status}")
            return resp
        raise AssertionError("unreachable")

    def _refusal(self, ref: ImageReference, status: int) -> str:
        """Why the registry still refuses after we authenticated: whose credentials, never which."""
        word = "unauthorized" if status == 401 else "denied"
        credentials = self._credentials.get((ref.registry, ref.repository))
        if credentials is None:
            return (f"{word}: {ref.registry} refused anonymous access to {ref.repository} (HTTP {status}); "
                    "configure credentials for it (see base_image_auth_file)")
        return f"{word}: {ref.registry} refused the credentials from {credentials.source} for {ref.repository} (HTTP {status})"

    async def get_manifest(self, ref: ImageReference, reference: str) -> FetchedManifest:
        """The manifest or index named by a tag or digest; a digest reference is verified."""
        if not (is_digest(reference) or is_tag(reference)):
            raise ValueError(f"invalid manifest reference {reference!r}")
        resp = await self._get(ref, f"manifests/{reference}", {"Accept": ", ".join(MANIFEST_ACCEPT)})
        async with resp:
            data = await _read_limited(resp, MAX_MANIFEST_SIZE, "manifest")
            header_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if is_digest(reference) and digest != reference:
            raise UpstreamError(
                f"{ref.registry}/{ref.repository}: manifest {reference} has digest {digest}"
            )
        doc = json_object(data)
        if doc is None:
            raise UpstreamError(f"{ref}: manifest is not a JSON object")
        body_type = doc.get("mediaType")
        media_type = body_type if isinstance(body_type, str) and body_type else header_type
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            raise UpstreamError(f"{ref}: unsupported manifest type {media_type!r}")
        return FetchedManifest(data, media_type, digest)

    async def get_small_blob(self, ref: ImageReference, digest: str, size: int, limit: int) -> bytes:
        """A blob held in memory (an image config), checked against digest and size."""
        if size > limit:
            raise UpstreamError(f"{ref}: blob {digest} of {size} bytes is over the {limit} byte limit")
        resp = await self._get(ref, f"blobs/{_checked(digest)}", {})
        async with resp:
            data = await _read_limited(resp, size, f"blob {digest}")
        _verify(ref, digest, size, len(data), hashlib.sha256(data).hexdigest())
        return data

    async def fetch_blob(self, ref: ImageReference, digest: str, size: int, directory: Path) -> Path:
        """Stream a blob into a new file under `directory`, hashing as it arrives.

        Returns the file only when its sha256 and size match; otherwise the file is
        removed and UpstreamError raised.
        """
        resp = await self._get(ref, f"blobs/{_checked(digest)}", {})
        fd, name = tempfile.mkstemp(dir=directory, prefix="upstream-")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                hasher = hashlib.sha256()
                received = 0
                pending: list[bytes] = []
                pending_size = 0
                async with resp:
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        received += len(chunk)
                        if received > size:
                            raise UpstreamError(f"{ref}: blob {digest} is longer than its {size} bytes")
                        pending.append(chunk)
                        pending_size += len(chunk)
                        if pending_size >= _FLUSH:
                            await asyncio.to_thread(_write_and_hash, handle, hasher, pending)
                            pending, pending_size = [], 0
                await asyncio.to_thread(_write_and_hash, handle, hasher, pending)
            _verify(ref, digest, size, received, hasher.hexdigest())
        except aiohttp.ClientError as exc:
            path.unlink(missing_ok=True)
            raise UpstreamError(f"{ref}: blob {digest}: {exc}") from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL an upstream chose: its path and any user:password@
    stay out of messages."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    host = parts.hostname or "?"
    return f"{parts.scheme}://{'[' + host + ']' if ':' in host else host}{port}"


def _write_and_hash(handle, hasher, chunks: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    for chunk in chunks:
        hasher.update(chunk)
        handle.write(chunk)


def _checked(digest: str) -> str:
    if not is_digest(digest):
        raise UpstreamError(f"not a sha256 digest: {digest!r}")
    return digest


def _verify(ref: ImageReference, digest: str, size: int, received: int, hexdigest: str) -> None:
    if received != size:
        raise UpstreamError(f"{ref}: blob {digest} has {received} bytes, expected {size}")
    if "sha256:" + hexdigest != digest:
        raise UpstreamError(f"{ref}: blob {digest} does not match its digest (got sha256:{hexdigest})")


async def _read_limited(resp: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body, refusing anything over `limit` bytes before reading it all."""
    if resp.content_length is not None and resp.content_length > limit:
        raise UpstreamError(f"{what} of {resp.content_length} bytes is over the {limit} byte limit")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in resp.content.iter_chunked(64 << 10):
            total += len(chunk)
            if total > limit:
                raise UpstreamError(f"{what} is over the {limit} byte limit")
            chunks.append(chunk)
    except aiohttp.ClientError as exc:  # a body cut short or stalled: as failed as a refusal
        raise UpstreamError(f"{what}: {exc}") from exc
    return b"".join(chunks)
