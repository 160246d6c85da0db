"""One log line and the HTTP metrics for every request, errors and hang-ups included.

A middleware rather than aiohttp's access logger: it sees the registry error the error
middleware turned into a response (its code and reason go on the same line, so an error
is one line, not two), it runs on `condery serve`'s own connection handler and under the
test server alike, and it has this app's Metrics at hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from aiohttp import hdrs, web

from condery.auth.http import USER_KEY
from condery.observability.logs import event
from condery.observability.metrics import Metrics
from condery.oci.errors import RegistryError

log = logging.getLogger("condery.access")

# Set by the error middleware on the request: the error its response carries, and the
# unexpected exception behind it (logged with its traceback on the request's line).
ERROR_KEY = web.RequestKey("condery_error", RegistryError) if hasattr(web, "RequestKey") else "condery_error"
CAUSE_KEY = web.RequestKey("condery_cause", BaseException) if hasattr(web, "RequestKey") else "condery_cause"
# Longer paths are cut in the log line (a client may send up to 8 KiB of request line).
_MAX_LOGGED_PATH = 512
_NO_BODY = frozenset({204, 304})
# nginx's "client closed request": the handler was cancelled, nobody reads the answer.
CLIENT_GONE = 499

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def note_error(request: web.Request, error: RegistryError, cause: BaseException | None = None) -> None:
    """Put the error a response carries (and an unexpected cause) on the request's log line."""
    request[ERROR_KEY] = error
    if cause is not None:
        request[CAUSE_KEY] = cause


def access_middleware(metrics: Metrics) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status, size = 500, 0
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            status = CLIENT_GONE
            raise
        except web.HTTPException as exc:  # redirects and the like, passed through
            status = exc.status
            raise
        # Anything else: the connection is cut (a blob stream failed once started): 500.
        else:
            status = response.status
            if request.method != hdrs.METH_HEAD and status not in _NO_BODY:
                size = response.content_length or 0
            return response
        finally:
            seconds = time.monotonic() - started
            metrics.request(request.method, request.path, status, seconds)
            _log_request(request, status, size, seconds)

    return middleware


def _log_request(request: web.Request, status: int, size: int, seconds: float) -> None:
    error: RegistryError | None = request.get(ERROR_KEY)
    fields: dict[str, object] = {
        "method": request.method,
        "path": request.path[:_MAX_LOGGED_PATH],
        "status": status,
        "bytes": size,
        "duration_s": seconds,
        "client": request.remote or "unknown",
    }
    user = request.get(USER_KEY)
    if user:  # with auth: who it was (a login's name; never a password or token)
        fields["user"] = user
    if error is not None:
        # The error body's code and message: what the client was told, nothing more.
        fields["error"] = error.code
        fields["reason"] = error.message
    # Refusals and passing faults are what an operator looks for first; a 404 is the
    # client's business.
    level = logging.WARNING if status >= 500 or status == 429 else logging.INFO
    cause: BaseException | None = request.get(CAUSE_KEY)
    if cause is not None:
        level = logging.ERROR
    event(log, level, "request", cause, **fields)
