"""Endpoints for operators and their tools (contract: DESIGN.md "Beyond /v2/").

    GET /healthz   200 while the process serves: no I/O, so a busy store never fails it
    GET /readyz    200 when the store answers (filesystem: takes a write; S3: HeadBucket),
                   else 503 UNAVAILABLE with the reason (no path, no credential)
    GET /metrics   Prometheus text format, from this app's own registry
"""

from __future__ import annotations

import asyncio

from aiohttp import hdrs, web

from condery.observability.metrics import CONTENT_TYPE, Metrics
from condery.oci.errors import Unavailable
from condery.storage import StorageError, Store

# Seconds a readiness probe waits for the store: probes (kubelet's) give up after 1-10 s,
# and an unreachable endpoint must answer "not ready", not hang the probe.
READY_TIMEOUT = 5


def register(app: web.Application, store: Store, metrics: Metrics) -> None:
    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.StreamResponse:
        try:
            await asyncio.wait_for(store.ping(), READY_TIMEOUT)
        except asyncio.TimeoutError:
            raise Unavailable(f"not ready: the store did not answer within {READY_TIMEOUT} s") from None
        except StorageError as exc:  # its messages are path- and credential-free by contract
            raise Unavailable(f"not ready: {exc}") from None
        return web.json_response({"status": "ready"})

    async def metrics_text(request: web.Request) -> web.StreamResponse:
        return web.Response(body=metrics.render(), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
