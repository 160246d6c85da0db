"""Connections are scarce: how `condery serve` runs aiohttp so that no client holds them.

aiohttp's `web.run_app` gives every connection 75 s of keep-alive, has no deadline for a
request's headers, accepts connections until file descriptors run out, and then logs a
traceback for every failed accept. Here:

- `header_timeout`: a request's headers must be complete within this many seconds of the
  connection opening (or of the first byte of a later request on it), else the client
  gets a 408 and the connection is closed. aiohttp has no such setting, so
  `_GuardedHandler` (a `RequestHandler` subclass) keeps a timer per connection.
- `idle_timeout`: aiohttp's own `keepalive_timeout`, the silent wait between requests
  (suspended while a request's headers are due).
- `max_connections`: past it a new connection gets a 503 UNAVAILABLE and is closed at
  once, before aiohttp allocates anything for it; one log line per `LOG_INTERVAL` says
  how many were refused. The default is half the open-file limit, which `serve` first
  raises to its hard limit (`raise_open_file_limit`): the other half is for the store,
  package extraction and builds.
- `max_connections_per_client`: the same, per peer address, so that one client cannot
  take every connection (default: an eighth of `max_connections`). Behind a reverse
  proxy every connection comes from the proxy: raise it to `max_connections` there and
  limit clients in the proxy (docs/reverse-proxy.md).
- Oversized or malformed request lines and headers get a 4xx (431 for header fields
  past the limits, 400 otherwise) in the OCI error format instead of aiohttp's text
  body and logged traceback.
- An accept that fails for lack of file descriptors (EMFILE) is one log line per
  `LOG_INTERVAL`, not one traceback per attempt (asyncio already backs off for 1 s).

The handler subclass reads a few attributes of aiohttp's `RequestHandler`
(`_request_in_progress`, `_messages`, `_close`, `_force_close`): they are the same state
aiohttp's own keep-alive timer checks, and tests/test_server.py fails if they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import resource
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from condery.oci.errors import RegistryError, Unavailable, error_body
from condery.registry.server import API_VERSION, API_VERSION_HEADER

log = logging.getLogger("condery.connections")

LOG_INTERVAL = 10.0  # seconds between two log lines about the same kind of refusal
AUTO_MAX_CONNECTIONS = 4096  # ceiling of the default, whatever the file limit
MIN_MAX_CONNECTIONS = 16
# When the hard limit is "unlimited", Linux still refuses more than nr_open (1048576).
UNLIMITED_NOFILE = 1 << 20


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_connections_per_client: int
    header_timeout: float
    idle_timeout: float
    # aiohttp's defaults, named here so that tests and the docs can quote them.
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 128


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. a hard limit above fs.nr_open
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    return UNLIMITED_NOFILE if soft == resource.RLIM_INFINITY else soft


def default_max_connections(open_file_limit: int) -> int:
    """Half the open-file limit, within [MIN_MAX_CONNECTIONS, AUTO_MAX_CONNECTIONS]."""
    return max(MIN_MAX_CONNECTIONS, min(AUTO_MAX_CONNECTIONS, open_file_limit // 2))


def default_max_connections_per_client(max_connections: int) -> int:
    """An eighth of the total, at least 8 (a node pulls with a handful at a time)."""
    return min(max_connections, max(8, max_connections // 8))


@dataclass
class Throttled:
    """Counts events of one kind and logs at most one line per `interval` about them.

    The first event is reported at once; later ones are counted, and the count is
    reported `interval` after the previous line (from the event loop, when one runs), so
    a burst that stops is still reported in full.
    """

    what: str  # e.g. "connections refused at max_connections=50"
    interval: float = LOG_INTERVAL
    clock: Callable[[], float] = time.monotonic
    pending: int = 0
    total: int = 0
    _last: float = field(default=float("-inf"), repr=False)
    _detail: str = field(default="", repr=False)
    _flush: asyncio.TimerHandle | None = field(default=None, repr=False)

    def event(self, detail: str = "") -> None:
        self.pending += 1
        self.total += 1
        self._detail = detail
        wait = self._last + self.interval - self.clock()
        if wait <= 0:
            self._report()
        elif self._flush is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the next event reports
                self._flush = asyncio.get_running_loop().call_later(wait, self._report)

    def _report(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self.pending:
            log.warning(
                "%s: %d since the last report (%d in all)%s", self.what, self.pending, self.total, self._detail
            )
            self.pending = 0
            self._last = self.clock()


@dataclass
class ConnectionGate:
    """Open connections of one listener, in all and by client address; refusals past them."""

    limit: int
    per_client: int
    open: int = 0
    by_client: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.refused = Throttled(f"connections refused at max_connections={self.limit}")
        self.refused_client = Throttled(f"connections refused at max_connections_per_client={self.per_client}")

    def admit(self, client: str) -> bool:
        if self.open >= self.limit:
            self.refused.event()
            return False
        if self.by_client[client] >= self.per_client:
            self.refused_client.event(f", the last from {client}")
            return False
        self.open += 1
        self.by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]  # the counter holds only clients with connections


def _raw_error(error: RegistryError) -> bytes:
    """A complete HTTP/1.1 answer for a connection that is closed right after it."""
    body = json.dumps(error_body([error])).encode()
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"{API_VERSION_HEADER}: {API_VERSION}",
    ]
    if error.retry_after is not None:
        head.append(f"Retry-After: {error.retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_TOO_MANY_CONNECTIONS = _raw_error(
    Unavailable("the registry has too many open connections; retry shortly", retry_after=1)
)
_HEADERS_TOO_SLOW = _raw_error(
    RegistryError("the request headers did not arrive in time", status=HTTPStatus.REQUEST_TIMEOUT)
)


def _bad_request_error(exc: BaseException | None, limits: ConnectionLimits) -> RegistryError:
    """The client's error for what aiohttp's parser refused (without echoing the input)."""
    if isinstance(exc, LineTooLong) or "Too many headers" in str(exc):
        return RegistryError(
            f"request line or header fields too large (at most {limits.max_line_size} bytes a line, "
            f"{limits.max_field_size} bytes a header, {limits.max_headers} headers)",
            status=HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
        )
    return RegistryError("malformed HTTP request", status=HTTPStatus.BAD_REQUEST)


class _GuardedHandler(web.RequestHandler):
    """aiohttp's connection protocol, plus the gate, a header deadline and OCI 4xx bodies."""

    def __init__(self, manager: web.Server, *, gate: ConnectionGate, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(
            manager,
            keepalive_timeout=limits.idle_timeout,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
            **kwargs,
        )
        self._gate = gate
        self._limits = limits
        self._client: str | None = None  # peer address, once admitted
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self._gate.admit(client):
            # Refused before aiohttp sets anything up; close() still sends the answer.
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._client = client
        super().connection_made(transport)
        self._start_header_timer()  # the first request is due within header_timeout

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._client is None:  # refused: aiohttp never saw it
            return
        self._gate.release(self._client)
        self._client = None
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and self._awaiting_request():
            self._start_header_timer()  # the first byte of a later request
        super().data_received(data)
        if not self._awaiting_request():
            self._stop_header_timer()  # headers complete (or refused by the parser)

    def _awaiting_request(self) -> bool:
        """Between requests: none queued, none being answered, not closing."""
        return not (self._request_in_progress or self._messages or self._close or self._force_close)

    def _start_header_timer(self) -> None:
        # While headers are due, their deadline alone governs: keep_alive(True) cancels
        # aiohttp's idle timer, which it re-arms after the response.
        self.keep_alive(True)
        self._header_timer = self._loop.call_later(self._limits.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_request() and self.transport is not None:
            self.transport.write(_HEADERS_TOO_SLOW)
            self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp calls this for requests its parser refused (status 400) and for
        # exceptions that escape the application (500; the error middleware leaves none).
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: nothing more can be sent
            raise ConnectionError("response already started")
        error = _bad_request_error(exc, self._limits)
        log.debug("refused a malformed request from %s: %s", request.remote, exc)
        response = web.Response(
            status=error.status,
            body=json.dumps(error_body([error])).encode(),
            content_type="application/json",
            headers={API_VERSION_HEADER: API_VERSION},
        )
        response.force_close()
        return response


class _GuardedSite(web.BaseSite):
    """A TCP listener whose connections are `_GuardedHandler`s."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, protocol: Callable[[], web.RequestHandler]
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._protocol = protocol

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self._host, self._port, reuse_address=True)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Make EMFILE/ENFILE on accept one throttled log line instead of a traceback each."""
    throttled = Throttled("accept failed for lack of file descriptors or memory")
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            throttled.event()
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, host: str, port: int, limits: ConnectionLimits, *, access_log_format: str
) -> AsyncIterator[_GuardedSite]:
    """Serve `app` on host:port under `limits` until the block ends, then clean up."""
    quiet_accept_errors(asyncio.get_running_loop())
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        assert runner.server is not None
        protocol = functools.partial(
            _GuardedHandler,
            runner.server,
            loop=asyncio.get_running_loop(),
            gate=ConnectionGate(limits.max_connections, limits.max_connections_per_client),
            limits=limits,
            access_log_format=access_log_format,
        )
        site = _GuardedSite(runner, host, port, protocol)
        await site.start()
        yield site
    finally:
        await runner.cleanup()
