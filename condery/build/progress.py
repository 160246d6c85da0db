"""Where each image build is: its state, packages and bytes done of total, its outcome.

The pipeline (build/pipeline.py) reports through the `BuildProgress` protocol; a
`BuildStatus` is one build's record of it, and `BuildTracker` keeps the statuses of the
builds in flight and of recently finished ones, for the builds API (`GET
/api/v1/builds/<id>`), the landing page and tests. A client that polls after a build
ended still finds `done` or `failed` for a while: finished statuses are kept for
`keep_seconds` and at most `keep_finished` of them, so the table stays bounded however
many names are asked for.

Bytes are the package sizes from repodata (the archives' sizes): a package counts as
done once its layer is built or found in the cache.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

State = Literal["queued", "solving", "building", "done", "failed"]
FINISHED: frozenset[str] = frozenset({"done", "failed"})
KEEP_FINISHED = 1000  # finished statuses kept at most
KEEP_SECONDS = 3600.0  # and for at most this long after they finished


def build_id(image_key: str) -> str:
    """The id of the build of an image record key: stable for (canonical name, tag,
    configuration), so asking twice gives the same id, and free of the name's characters
    so it fits in a URL path segment."""
    return hashlib.sha256(image_key.encode()).hexdigest()[:24]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class BuildStatus:
    """One image build as the builds API shows it; also the pipeline's `BuildProgress`."""

    id: str
    name: str  # canonical
    tag: str
    state: State = "queued"
    packages_done: int = 0
    packages_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    error: tuple[str, str] | None = None  # (registry error code, message)
    digest: str | None = None  # the top-level OCI manifest or index, once done
    started_at: float = field(default_factory=time.time)  # when it was asked for (queued)
    finished_at: float | None = None
    # time.monotonic() of the end, for the tracker's retention (wall clocks jump).
    finished_mono: float | None = field(default=None, repr=False)

    # -- BuildProgress ------------------------------------------------------------
    def solving(self, platform: str) -> None:
        if self.state == "queued":
            self.state = "solving"

    def solved(self, platform: str, packages: int, size: int) -> None:
        # Platforms solve one by one: the totals grow as each one's solve ends.
        self.state = "building"
        self.packages_total += packages
        self.bytes_total += size

    def layer_done(self, platform: str, package: str, built: bool, size: int) -> None:
        self.packages_done += 1
        self.bytes_done += size

    def assembling(self, platform: str) -> None:
        pass  # manifests take milliseconds: no state of their own

    # -- the outcome --------------------------------------------------------------
    def started(self) -> None:
        """The build holds a build slot: it leaves the queue."""
        self.solving("")

    def finished(self, digest: str) -> None:
        self.state, self.digest = "done", digest
        self._end()

    def failed(self, code: str, message: str) -> None:
        self.state, self.error = "failed", (code, message)
        self._end()

    def _end(self) -> None:
        self.finished_at, self.finished_mono = time.time(), time.monotonic()

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tag": self.tag,
            "state": self.state,
            "progress": {
                "packages_done": self.packages_done,
                "packages_total": self.packages_total,
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
            },
            "error": None if self.error is None else {"code": self.error[0], "message": self.error[1]},
            "digest": self.digest,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


class BuildTracker:
    """The statuses of builds in flight and of recent ones, by build id."""

    def __init__(self, keep_finished: int = KEEP_FINISHED, keep_seconds: float = KEEP_SECONDS) -> None:
        self.keep_finished = keep_finished
        self.keep_seconds = keep_seconds
        self._statuses: OrderedDict[str, BuildStatus] = OrderedDict()  # oldest first

    def start(self, image_key: str, name: str, tag: str) -> BuildStatus:
        """A new status, replacing a finished one of the same build (a retry)."""
        status = BuildStatus(build_id(image_key), name, tag)
        self._statuses.pop(status.id, None)
        self._statuses[status.id] = status
        self._prune()
        return status

    def get(self, id: str) -> BuildStatus | None:
        self._prune()
        return self._statuses.get(id)

    def of(self, image_key: str) -> BuildStatus | None:
        return self.get(build_id(image_key))

    def discard(self, status: BuildStatus) -> None:
        """Forget a build that never started (dropped from the queue, or refused)."""
        if self._statuses.get(status.id) is status:
            del self._statuses[status.id]

    def listing(self) -> list[BuildStatus]:
        """Builds in flight (oldest first), then finished ones (most recent first)."""
        self._prune()
        statuses = list(self._statuses.values())
        active = [s for s in statuses if not s.is_finished]
        finished = sorted((s for s in statuses if s.is_finished), key=lambda s: s.finished_mono or 0.0, reverse=True)
        return active + finished

    def _prune(self) -> None:
        # Builds in flight are never dropped: they are bounded by the build queue.
        now = time.monotonic()
        finished = [s for s in self._statuses.values() if s.is_finished]
        finished.sort(key=lambda s: s.finished_mono or 0.0)
        excess = len(finished) - self.keep_finished
        for i, status in enumerate(finished):
            if i < excess or now - (status.finished_mono or now) > self.keep_seconds:
                del self._statuses[status.id]
