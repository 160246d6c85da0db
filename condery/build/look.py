"""Look before you pull: what a name and tag solve to, and what was built, without building.

The images API and the image pages answer from here (`ImageService.look`). A solve is
cached under the image record's key (records/keys.py's ImageKeys: name, tag and every setting
that shapes the image) for as long as a pull's answer would be (records/freshness.py), so
looking at a name again and again costs one solve per `latest_ttl`, like pulling it.
A definitive failure goes to the same memory of outcomes a pull uses (outcomes.py).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence

import rattler

from condery.build.assembly import LABEL_PREFIX
from condery.common.redact import redact_url
from condery.common.singleflight import SingleFlight
from condery.image.tags import Latest, Snapshot
from condery.layers.env_layer import explicit_lock
from condery.layers.pip_resolve import PinnedWheel
from condery.layers.solve import public_message
from condery.oci.manifest import ManifestError
from condery.oci.references import references
from condery.records.freshness import Freshness
from condery.records.schemas import ImageRecord
from condery.storage import Store

SOLVE_CACHE_ENTRIES = 1024
RECENT_FAILURES = 20
_PACKAGES_ANNOTATION = f"{LABEL_PREFIX}.packages"


@dataclass(frozen=True)
class SolvedPackage:
    name: str
    version: str
    build: str
    channel: str  # without credentials
    sha256: str | None
    size: int
    url: str  # without credentials: the lock's line
    md5: str | None = None
    depends: tuple[str, ...] = ()  # the record's dependencies (a conda-lock file lists them)


@dataclass(frozen=True)
class SolvedWheel:
    name: str
    version: str
    url: str  # without credentials
    sha256: str


@dataclass(frozen=True)
class SolvedPlatform:
    packages: tuple[SolvedPackage, ...]
    lock: str  # the explicit lock the image's environment layer holds
    wheels: tuple[SolvedWheel, ...] = ()  # an environment file's pip packages

    @property
    def size(self) -> int:
        return sum(p.size for p in self.packages)


@dataclass(frozen=True)
class Solved:
    """One solve of a name and tag on every configured platform."""

    data_as_of: float  # when the oldest repodata it used was fetched (Freshness reads this)
    platforms: Mapping[str, SolvedPlatform]  # conda subdir -> packages
    skipped: Mapping[str, str] = field(default_factory=dict)  # conda subdir -> why it does not solve


def solved_platform(records: Sequence[rattler.RepoDataRecord], subdir: str,
                    wheels: Sequence[PinnedWheel] = ()) -> SolvedPlatform:
    packages = tuple(sorted(
        (
            SolvedPackage(
                name=r.name.normalized,
                version=str(r.version),
                build=str(r.build),
                channel=redact_url(str(r.channel or "")),
                sha256=r.sha256.hex() if r.sha256 is not None else None,
                size=int(r.size or 0),
                url=redact_url(r.url),
                md5=r.md5.hex() if r.md5 is not None else None,
                depends=tuple(r.depends),
            )
            for r in records
        ),
        key=lambda p: p.name,
    ))
    pinned = tuple(SolvedWheel(w.name, w.version, redact_url(w.url), w.sha256) for w in wheels)
    return SolvedPlatform(packages, explicit_lock(records, subdir), pinned)


def shown_channels(channels: Sequence[str]) -> list[str]:
    """The configured channels as a page shows them: without credentials, and a local
    channel by its directory's name (as in error messages: its path is the server's business)."""
    return [public_message(redact_url(c), channels) for c in channels]


@dataclass(frozen=True)
class BuiltLayer:
    platform: str  # "os/arch"
    digest: str
    size: int
    packages: tuple[str, ...]  # empty for the base image's layers


@dataclass(frozen=True)
class ImageLook:
    name: str
    tag: str
    solved: Solved
    digest: str | None  # the top-level manifest a pull gets now; None until built
    layers: list[BuiltLayer] | None
    kernels: list[dict[str, Any]] = field(default_factory=list)  # build/kernels.py kernels_json
    changeable: dict[str, Any] | None = None  # build/changeable.py changeable_json

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tag": self.tag,
            "platforms": {
                subdir: {
                    "packages": [
                        {k: getattr(p, k) for k in ("name", "version", "build", "channel", "sha256", "size", "url")}
                        for p in platform.packages
                    ],
                    "size": platform.size,
                    "lock": platform.lock,
                    "pip": [{"name": w.name, "version": w.version, "url": w.url, "sha256": w.sha256}
                            for w in platform.wheels],
                }
                for subdir, platform in self.solved.platforms.items()
            },
            "skipped": dict(self.solved.skipped),
            "kernels": self.kernels,
            "changeable": self.changeable,
            "digest": self.digest,
            "layers": None if self.layers is None else [
                {"platform": layer.platform, "digest": layer.digest, "size": layer.size,
                 "packages": list(layer.packages)}
                for layer in self.layers
            ],
        }


class SolveCache:
    """Solves by image key, answered while a pull's record would be fresh; one solve at a time per key."""

    def __init__(self, freshness: Freshness, concurrency: int, entries: int = SOLVE_CACHE_ENTRIES) -> None:
        self.freshness = freshness
        self.entries = entries
        # Looks do not pass the build queue (they cost no layers), but a solve costs a
        # core: at most `concurrency` at once, so that looking at many names cannot starve pulls.
        self._slots = asyncio.Semaphore(concurrency)
        self._solves: OrderedDict[str, Solved] = OrderedDict()
        self._flights: SingleFlight[Solved] = SingleFlight()

    def get(self, key: str, reference: Latest | Snapshot) -> Solved | None:
        solved = self._solves.get(key)
        # Freshness only reads `data_as_of`, which a Solved has like an ImageRecord.
        if solved is None or not self.freshness.is_fresh(solved, reference):  # type: ignore[arg-type]
            return None
        return solved

    async def solve(self, key: str, reference: Latest | Snapshot, work: Callable[[], Awaitable[Solved]]) -> Solved:
        cached = self.get(key, reference)
        if cached is not None:
            return cached
        solved = await self._flights.run(key, lambda: self._bounded(work))
        self._solves[key] = solved
        self._solves.move_to_end(key)
        while len(self._solves) > self.entries:
            self._solves.popitem(last=False)
        return solved


    async def _bounded(self, work: Callable[[], Awaitable[Solved]]) -> Solved:
        async with self._slots:
            return await work()


async def built_layers(store: Store, record: ImageRecord) -> list[BuiltLayer]:
    """Each platform's layers as its stored OCI manifest lists them."""
    layers: list[BuiltLayer] = []
    for platform, digests in sorted(record.platforms.items()):
        try:
            found = references(await store.get_blob_bytes(digests["oci"]))
        except (KeyError, ManifestError):
            continue  # removed or unreadable since the record was read: the next pull rebuilds it
        for layer in found.layers:
            packages = (layer.annotations or {}).get(_PACKAGES_ANNOTATION, "")
            layers.append(BuiltLayer(platform, layer.digest, layer.size, tuple(packages.split())))
    return layers
