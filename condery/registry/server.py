"""The OCI distribution pull API over aiohttp.

    GET       /v2/                            200 {}
    GET HEAD  /v2/<name>/manifests/<ref>      tag: resolve (builds if needed), negotiated; digest: stored
    GET HEAD  /v2/<name>/blobs/<digest>       streamed, Range, or a 307 to the store's URL
    GET       /v2/<name>/tags/list            ?n=&last=, Link rel="next"
    GET       /v2/<name>/referrers/<digest>   always an empty index: condery stores no referrers
    push (POST/PUT/PATCH/DELETE)              UNSUPPORTED (405)

Names contain slashes, so one tail route takes everything under /v2/ and the operation
is found from the end of the path. Every answer, errors included, carries
`Docker-Distribution-API-Version: registry/2.0`; every error is the spec's JSON body.

Handlers never cancel builds themselves: aiohttp does not cancel handlers when a client
hangs up (handler_cancellation is off by default), so the manifest handler watches its
connection and withdraws its wait when the client has gone; the service then drops a
build nobody waits for while it is still queued, and lets a started one finish.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, BinaryIO, Callable, Mapping, TypeVar
from urllib.parse import quote

from aiohttp import hdrs, web

from condery.auth.http import CHANNELS_KEY, MAY_PULL_KEY, auth_middleware, token_handler
from condery.auth.service import Authenticator
from condery.build import readback
from condery.common.redact import redact_text
from condery.image.names import ImageRef, ImageRequest
from condery.image.tags import Digest, parse_reference
from condery.observability.metrics import Metrics
from condery.oci.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    PaginationNumberInvalid,
    RangeInvalid,
    RegistryError,
    Unavailable,
    Unsupported,
    error_body,
)
from condery.oci.grammar import is_digest
from condery.oci.media_types import INDEX_TYPES, OCI_INDEX
from condery.registry import builds_api, environments_api, health, images_api, landing
from condery.registry.access_log import access_middleware, note_error
from condery.registry.builder import Builder
from condery.registry.negotiation import OCI_MANIFEST_TYPES, client_platform, negotiate, platform_manifest
from condery.storage import StorageError, Store

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
# For AppRunner/run_app: one short line per request (peer, request line, status, bytes, seconds).
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'

READ_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})
# Manifests are at most 4 MiB by the spec; keep only small ones in memory.
MANIFEST_CACHE_ENTRIES = 1024
MANIFEST_CACHE_MAX_ITEM = 256 * 1024
BLOB_CACHE_CONTROL = "public, max-age=31536000, immutable"

_UPLOADS_RE = re.compile(r"(?P<name>.+)/blobs/uploads(?:/[^/]*)?")
_MANIFEST_RE = re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)")
_BLOB_RE = re.compile(r"(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_TAGS_RE = re.compile(r"(?P<name>.+)/tags/list")
_REFERRERS_RE = re.compile(r"(?P<name>.+)/referrers/(?P<digest>[^/]+)")
# ASCII digits only: `\d` would also take Arabic-Indic and other Unicode digits.
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
# No blob reaches 10**19 bytes; longer positions are read as "past any end" rather than
# handed to int(), which refuses more than 4,300 digits (a 500 before this).
_MAX_POSITION_DIGITS = 19
# Set once a blob response has started: an error can then only cut the connection.
_STREAMING = web.RequestKey("condery_streaming", bool) if hasattr(web, "RequestKey") else "condery_streaming"
# Seconds between checks that a client waiting for a build is still connected.
HANG_UP_POLL = 0.5

T = TypeVar("T")


class RangeNotSatisfiable(Exception):
    """The Range header is well-formed but selects no byte of the blob."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive byte positions for a Range header, or None for all.

    Malformed or multi-range headers are ignored (RFC 9110 allows it) and the whole blob
    is served; a single range that selects nothing raises RangeNotSatisfiable. Never
    raises anything else, whatever the header holds.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # suffix: the last n bytes
        suffix = _position(last_text)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - suffix, 0), size - 1
    first = _position(first_text)
    last = _position(last_text) if last_text else size - 1
    if first >= size or last < first:
        raise RangeNotSatisfiable
    return first, min(last, size - 1)


def _position(digits: str) -> int:
    """A byte position from ASCII digits; absurdly long ones are past any blob's end."""
    digits = digits.lstrip("0") or "0"
    if len(digits) > _MAX_POSITION_DIGITS:
        return 10**_MAX_POSITION_DIGITS
    return int(digits)


@dataclass
class _ManifestCache:
    """Small LRU of manifest bytes by digest: content-addressed, so never stale."""

    entries: int = MANIFEST_CACHE_ENTRIES
    max_item: int = MANIFEST_CACHE_MAX_ITEM

    def __post_init__(self) -> None:
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, digest: str) -> bytes | None:
        data = self._data.get(digest)
        if data is not None:
            self._data.move_to_end(digest)
        return data

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self.max_item:
            return
        self._data[digest] = data
        self._data.move_to_end(digest)
        while len(self._data) > self.entries:
            self._data.popitem(last=False)


def error_response(error: RegistryError, headers: Mapping[str, str] | None = None) -> web.Response:
    all_headers = dict(headers or {})
    if error.retry_after is not None:
        all_headers[hdrs.RETRY_AFTER] = str(error.retry_after)
    # Solver and downloader errors quote channel URLs: no credential leaves in a body.
    return web.Response(
        status=error.status,
        body=redact_text(json.dumps(error_body([error]))).encode(),
        content_type="application/json",
        headers=all_headers,
    )


def _check_digest(digest: str) -> str:
    if not is_digest(digest):
        shown = digest if len(digest) <= 80 else digest[:77] + "..."
        raise DigestInvalid(f"invalid digest {shown!r}; expected sha256:<64 lowercase hex digits>")
    return digest


class PullAPI:
    """The request handlers, holding the service and store they answer from."""

    def __init__(self, service: Builder, store: Store) -> None:
        self.service = service
        self.store = store
        self.manifests = _ManifestCache()
        self._routes: list[tuple[re.Pattern[str], Callable[..., Awaitable[web.StreamResponse]]]] = [
            (_UPLOADS_RE, self.push),
            (_MANIFEST_RE, self.manifest),
            (_BLOB_RE, self.blob),
            (_TAGS_RE, self.tags_list),
            (_REFERRERS_RE, self.referrers),
        ]

    async def base(self, request: web.Request) -> web.StreamResponse:
        if request.method not in READ_METHODS:
            raise Unsupported(f"{request.method} /v2/ is not supported: condery is pull-only")
        return web.json_response({})

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        for pattern, handler in self._routes:
            match = pattern.fullmatch(tail)
            if match is not None:
                return await handler(request, **match.groupdict())
        raise NameUnknown(f"no such endpoint: {request.path[:120]}; condery serves the OCI pull API")

    async def push(self, request: web.Request, name: str) -> web.StreamResponse:
        raise Unsupported("condery builds images on demand; pushing is not supported")

    async def _reachable(self, request: web.Request, image_request: ImageRequest, digest: str) -> bool:
        """Under auth, a digest is served under a name only when an image of that name
        references it (the name's pull rule is the middleware's); without auth, always."""
        if request.get(MAY_PULL_KEY) is None:
            return True
        return await self.service.holds(image_request, digest)

    def _read_only(self, request: web.Request, what: str) -> None:
        if request.method not in READ_METHODS:
            raise Unsupported(f"{request.method} of {what} is not supported: condery is pull-only")

    async def manifest(self, request: web.Request, name: str, ref: str) -> web.StreamResponse:
        self._read_only(request, "manifests")
        image_request = await self.service.request_for(name, request.get(CHANNELS_KEY))
        reference = parse_reference(ref)
        if isinstance(reference, Digest):
            digest = reference.digest
            media_type = await self.service.manifest_media_type(digest)
            if media_type is None or not await self._reachable(request, image_request, digest):
                raise ManifestUnknown(f"manifest {digest} is not known to this registry")
        else:
            image = await _while_connected(
                request, self.service.resolve(image_request, reference, client=request.remote or "unknown")
            )
            digest, media_type = await self._negotiated(request, image)
        body = await self._manifest_bytes(digest)
        headers = {
            hdrs.CONTENT_TYPE: media_type,
            "Docker-Content-Digest": digest,
            hdrs.ETAG: f'"{digest}"',
        }
        if _etag_matches(request, digest):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers)

    async def _negotiated(self, request: web.Request, image: ImageRef) -> tuple[str, str]:
        """(digest, media type) of the manifest this client gets for a tag.

        Only tags are negotiated: a digest names one document, served as it is.
        """
        oci_only = image.docker_media_type in OCI_MANIFEST_TYPES  # zstd layers (build/pipeline.py)
        choice = negotiate(request.headers.getall(hdrs.ACCEPT, []), oci_only)
        if not choice.acceptable:
            raise ManifestUnknown(
                "this registry serves zstd layers, which only OCI image manifests can describe, "
                "and the client accepts no OCI manifest type; use containerd 1.5+, podman or Docker 23+"
            )
        if choice.variant == "docker":
            digest, media_type = image.docker_digest, image.docker_media_type
        else:
            digest, media_type = image.oci_digest, image.oci_media_type
        if choice.takes_index or media_type not in INDEX_TYPES:
            return digest, media_type
        # The index is read from the store (and the manifest cache): ImageRef knows only
        # the top-level digests, and a GET and a HEAD must pick the same child.
        wanted = client_platform(request.headers.get(hdrs.USER_AGENT))
        child = platform_manifest(await self._manifest_bytes(digest), wanted)
        if child is None:
            raise ManifestUnknown(
                f"{media_type} {digest} lists no platform manifest for a client that accepts no index"
            )
        return child.digest, child.media_type

    async def _manifest_bytes(self, digest: str) -> bytes:
        body = self.manifests.get(digest)
        if body is None:
            try:
                body = await self.store.get_blob_bytes(digest)
            except KeyError:
                raise ManifestUnknown(f"manifest {digest} is missing from storage") from None
            self.manifests.put(digest, body)
        return body

    async def blob(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        self._read_only(request, "blobs")
        image_request = await self.service.request_for(name, request.get(CHANNELS_KEY))
        _check_digest(digest)
        info = await self.store.blob_info(digest)
        if info is None or not await self._reachable(request, image_request, digest):
            raise BlobUnknown(f"blob {digest} is not known to this registry")
        headers = {
            hdrs.CONTENT_TYPE: "application/octet-stream",
            "Docker-Content-Digest": digest,
            hdrs.ETAG: f'"{digest}"',
            hdrs.ACCEPT_RANGES: "bytes",
            hdrs.CACHE_CONTROL: BLOB_CACHE_CONTROL,
        }
        if request.method == hdrs.METH_GET:
            url = await self.store.blob_redirect_url(digest)
            if url is not None:
                return web.Response(status=307, headers={hdrs.LOCATION: url, "Docker-Content-Digest": digest})
        try:
            byte_range = parse_range(request.headers.get(hdrs.RANGE), info.size)
        except RangeNotSatisfiable:
            return error_response(
                RangeInvalid(f"range {request.headers[hdrs.RANGE][:80]!r} is outside the blob ({info.size} bytes)"),
                headers={hdrs.CONTENT_RANGE: f"bytes */{info.size}", hdrs.ACCEPT_RANGES: "bytes"},
            )
        if byte_range is None:
            status, offset, length = 200, 0, info.size
        else:
            status, offset, length = 206, byte_range[0], byte_range[1] - byte_range[0] + 1
            headers[hdrs.CONTENT_RANGE] = f"bytes {byte_range[0]}-{byte_range[1]}/{info.size}"
        if status == 200 and _etag_matches(request, digest):
            return web.Response(status=304, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        if request.method == hdrs.METH_HEAD or length == 0:
            await response.prepare(request)
            await response.write_eof()
            return response
        try:
            handle = await self.store.open_blob_file(digest)
        except KeyError:
            raise BlobUnknown(f"blob {digest} is not known to this registry") from None
        if handle is not None:
            with handle:
                await response.prepare(request)
                request[_STREAMING] = True
                await _send_file(request, response, handle, offset, length)
                await response.write_eof()
            return response
        chunks = self.store.read_blob(digest, offset, length).__aiter__()
        try:
            first = await chunks.__anext__()
        except (KeyError, StopAsyncIteration):
            # Removed between blob_info and now: still time to answer with an error.
            raise BlobUnknown(f"blob {digest} is not known to this registry") from None
        await response.prepare(request)
        # From here on the status is sent: a failure can only cut the connection, and the
        # client sees a body shorter than Content-Length.
        request[_STREAMING] = True
        await response.write(first)
        async for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def tags_list(self, request: web.Request, name: str) -> web.StreamResponse:
        self._read_only(request, "tags")
        image_request = await self.service.request_for(name, request.get(CHANNELS_KEY))
        n_text = request.query.get("n")
        n: int | None = None
        if n_text is not None:
            try:
                n = int(n_text)
            except ValueError:
                n = -1
            if n < 0:
                raise PaginationNumberInvalid(f"n must be a non-negative integer, not {n_text[:40]!r}")
        tags = sorted(set(await self.service.tags(image_request)))
        last = request.query.get("last")
        if last is not None:
            tags = [tag for tag in tags if tag > last]
        headers: dict[str, str] = {}
        if n is not None and len(tags) > n:
            tags = tags[:n]
            if tags:
                link = f"/v2/{name}/tags/list?n={n}&last={quote(tags[-1], safe='')}"
                headers[hdrs.LINK] = f'<{link}>; rel="next"'
        return web.json_response({"name": name, "tags": tags}, headers=headers)

    async def referrers(self, request: web.Request, name: str, digest: str) -> web.StreamResponse:
        self._read_only(request, "referrers")
        await self.service.request_for(name, request.get(CHANNELS_KEY))
        _check_digest(digest)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        return web.Response(body=json.dumps(index).encode(), content_type=OCI_INDEX)


async def _while_connected(request: web.Request, work: Awaitable[T]) -> T:
    """`work`'s result, or its cancellation once the client has hung up."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HANG_UP_POLL)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                # Nobody reads this answer; 499 (nginx's "client closed request") is for the log.
                raise RegistryError("the client hung up before the image was ready", code="UNKNOWN", status=499)
    finally:
        task.cancel()  # no-op when done; else the client has gone (or the handler was cancelled)


def _etag_matches(request: web.Request, digest: str) -> bool:
    if_none_match = request.headers.get(hdrs.IF_NONE_MATCH)
    if not if_none_match:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return f'"{digest}"' in tags or "*" in tags


@web.middleware
async def _error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except RegistryError as error:
        note_error(request, error)
        # An auth refusal carries its challenge (WWW-Authenticate): auth/http.py.
        return error_response(error, getattr(error, "headers", None))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _http_exception_error(request, exc)
        note_error(request, error)
        return error_response(error)
    except StorageError as exc:
        if request.get(_STREAMING):
            raise
        # StorageError messages name the blob or record and the cause, never a path.
        error = Unavailable(f"the store failed: {exc}")
        note_error(request, error, exc)  # the request's line carries the traceback
        return error_response(error)
    except Exception as exc:
        if request.get(_STREAMING):
            raise
        error = RegistryError()
        note_error(request, error, exc)  # the request's line carries the traceback
        return error_response(error)



async def _send_file(request: web.Request, response: web.StreamResponse, handle: BinaryIO, offset: int,
                     length: int) -> None:
    """`length` bytes of `handle` from `offset` to the client, by sendfile(2): the bytes go
    from the page cache to the socket without passing through the process (measured:
    blob GETs at 0.75x nginx's sendfile when read and written in 1 MB chunks). asyncio
    falls back to reads and writes itself where sendfile cannot work (TLS); the headers
    are already out (aiohttp sends them on prepare)."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("the client went away")
    await asyncio.get_running_loop().sendfile(transport, handle, offset, length)

def _http_exception_error(request: web.Request, exc: web.HTTPException) -> RegistryError:
    """The spec's error for aiohttp's own 4xx (unmatched route, wrong method)."""
    if exc.status == 404:
        return NameUnknown(f"no such endpoint: {request.path[:120]}; condery serves the OCI pull API under /v2/")
    if exc.status == 405:
        return Unsupported(f"{request.method} {request.path[:120]} is not supported")
    return RegistryError(exc.reason, status=exc.status)


def _build_name(service: Builder, id: str) -> str | None:
    """The canonical name of a build the builds API shows (its pull rule guards it)."""
    status = service.outcomes.builds.get(id)
    return status.name if status is not None else None


async def _add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[API_VERSION_HEADER] = API_VERSION


def create_app(service: Builder, store: Store, metrics: Metrics | None = None,
               auth: Authenticator | None = None) -> web.Application:
    """The pull API as an aiohttp application (and /healthz, /readyz, /metrics).

    `metrics` is the AppState's; a fresh registry when none is given (tests). `auth`
    (from `auth:` in configuration) guards every route and serves `/token`; without it
    every request is anonymous and allowed, as before.
    """
    api = PullAPI(service, store)
    metrics = metrics or Metrics()
    # The request log is outermost: it sees every answer, the error middleware's included;
    # the auth middleware is inside the error middleware, which answers its refusals.
    middlewares = [access_middleware(metrics), _error_middleware]
    if auth is not None:
        middlewares.append(auth_middleware(auth, lambda: service.meta_packages, readback.FORMATS,
                                           lambda id: _build_name(service, id), lambda: service.config.channels))
    app = web.Application(middlewares=middlewares)
    if auth is not None:
        app.router.add_route("*", "/token", token_handler(auth, lambda: service.meta_packages))

        async def close_auth(_: web.Application) -> None:
            await auth.close()

        app.on_cleanup.append(close_auth)
    app.on_response_prepare.append(_add_api_version)
    app.router.add_route("*", "/v2", api.base)
    app.router.add_route("*", "/v2/", api.base)
    app.router.add_route("*", "/v2/{tail:.+}", api.dispatch)
    images_api.register(app, service)
    builds_api.register(app, service)
    environments_api.register(app, service)
    landing.register(app, service)
    health.register(app, store, metrics)
    return app
