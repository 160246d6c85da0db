"""Prometheus metrics, with prometheus-client (the reference client: text format,
histograms and label handling done right, and the parser the tests read it back with).

Every metric lives in a CollectorRegistry owned by one Metrics object held on AppState,
never in the process-global default registry: tests run several apps in one process.
Label values are bounded: HTTP routes are the kinds of endpoint (`route_of`), never an
image name, a digest or a client address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
ROUTES = ("/v2/", "manifests", "blobs", "tags", "referrers", "metrics", "healthz", "readyz", "api", "landing", "other")
# Seconds: from a cached manifest (a millisecond) to a cold build of a large image.
_HTTP_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600)
_BUILD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
_SOLVE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120)
# HTTP methods are a client's free text: anything else is counted as OTHER.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(path: str) -> str:
    """The bounded route label of a request path."""
    if path in ("/v2", "/v2/"):
        return "/v2/"
    if path.startswith("/v2/"):
        parts = path.rstrip("/").split("/")
        if len(parts) >= 5 and parts[-2] == "manifests":
            return "manifests"
        if len(parts) >= 5 and parts[-2] == "blobs" and parts[-1] != "uploads":
            return "blobs"
        if path.endswith("/tags/list"):
            return "tags"
        if len(parts) >= 5 and parts[-2] == "referrers":
            return "referrers"
        return "other"
    if path in ("/metrics", "/healthz", "/readyz"):
        return path[1:]
    if path == "/api" or path.startswith("/api/"):
        return "api"
    if path == "/" or path.startswith(("/images/", "/static/")):
        return "landing"  # the landing page, image pages and their static files
    return "other"


def method_of(method: str) -> str:
    return method if method in _METHODS else "OTHER"


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.http_requests = Counter(
            "condery_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.http_duration = Histogram(
            "condery_http_request_duration_seconds", "Time to answer a request", ["route"],
            buckets=_HTTP_BUCKETS, registry=r,
        )
        self.builds = Counter("condery_builds", "Image builds finished, by result (ok or failed)", ["result"], registry=r)
        self.build_duration = Histogram(
            "condery_build_duration_seconds", "Time of an image build, start to end", buckets=_BUILD_BUCKETS, registry=r
        )
        self.builds_in_flight = Gauge("condery_builds_in_flight", "Image builds running now", registry=r)
        self.builds_queued = Gauge("condery_builds_queued", "Image builds waiting for a slot", registry=r)
        self.layers = Counter(
            "condery_layers", "Package layers an image build needed, by result (built or reused)", ["result"],
            registry=r,
        )
        self.layer_bytes = Counter("condery_layer_bytes", "Bytes of the layers built (compressed)", registry=r)
        self.solve_duration = Histogram(
            "condery_solve_duration_seconds", "Time of one platform's solve", buckets=_SOLVE_BUCKETS, registry=r
        )
        self.download_bytes = Counter(
            "condery_package_download_bytes", "Bytes of package archives downloaded from the channels", registry=r
        )
        # Cross-replica build locks (coordination.py): acquired, waited (another replica
        # was building), unavailable (Redis could not answer: built without the lock).
        self.build_locks = Counter(
            "condery_build_locks", "Cross-replica build lock events, by event", ["event"], registry=r
        )
        self.gc_runs = Counter("condery_gc_runs", "Garbage collections run by serve (gc.interval), by result",
                               ["result"], registry=r)
        self.gc_removed = Counter("condery_gc_removed", "Blobs and records garbage collection removed", ["kind"],
                                  registry=r)
        self.gc_freed_bytes = Counter("condery_gc_freed_bytes", "Bytes garbage collection freed", registry=r)
        for result in ("ok", "failed"):
            self.builds.labels(result)
            self.gc_runs.labels(result)  # present at 0, so a rate() has a series from the start
        for result in ("built", "reused"):
            self.layers.labels(result)
        for event in ("acquired", "waited", "unavailable"):
            self.build_locks.labels(event)

    def watch_builds(self, running: Callable[[], int], queued: Callable[[], int]) -> None:
        """Read the build gauges from the build queue at each scrape (never stale)."""
        self.builds_in_flight.set_function(running)
        self.builds_queued.set_function(queued)

    def request(self, method: str, path: str, status: int, seconds: float) -> None:
        route = route_of(path)
        self.http_requests.labels(method_of(method), route, str(status)).inc()
        self.http_duration.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
