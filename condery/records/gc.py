"""Garbage collection: remove the blobs and records that no live image reaches.

Mark, from the records that are live:
- an image record is live when it is the newest-written record of its name and tag (what
  the tag answers with now), or was written or served within `gc.keep` (a record of
  another configuration fingerprint that some replica may still run with). A date tag's
  newest record is live forever, or until it was neither written nor served for
  `gc.snapshots_max_age`;
- an image a `latest` record replaced (a `replaced` record, written by RecordCache.put_image)
  for `gc.keep` after it was replaced: a client that read the old manifest can still pull;
- every image served within `gc.grace` (a `served` record, written at most once an hour
  per image and process);
- every base image (its records are few and name the blobs a build starts from);
- a pushed environment (`env/<id>`) while an image of its name is live, and for
  `gc.keep` after it was last pushed.
From those manifests and indexes, every config and layer they name is live; a layer or
manifest-type record is live when its blob is.

Sweep what is not live AND was written more than `gc.grace` ago: a build in progress on
any replica writes its blobs and records just now, so it is never swept under it.

Running gc on several replicas at once is safe: each run removes only what is both
unreachable and old, which no other run can make reachable again, and removing an
absent blob or record is a no-op. The one race left is a build that reuses an old layer
nothing live reaches (a package version no live image holds) while gc removes it: its
image then reads as a miss (RecordCache checks an image's blobs before trusting it) and
the layer is built again; nothing is served broken for long.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from condery.config import GcConfig
from condery.observability.metrics import Metrics
from condery.oci.grammar import is_digest
from condery.oci.references import walk
from condery.records import kinds
from condery.records.keys import ImageKey
from condery.records.schemas import TagsIndex
from condery.storage import Listed, StorageError, Store

log = logging.getLogger("condery.gc")
_DATE_TAG = re.compile(r"\d{4}-\d{2}-\d{2}")


@dataclass
class GcReport:
    """What a run removed (or, dry, would remove)."""

    dry_run: bool
    live_blobs: int = 0
    blobs: list[Listed] = field(default_factory=list)
    records: list[tuple[str, Listed]] = field(default_factory=list)  # (kind, entry)

    @property
    def bytes_freed(self) -> int:
        return sum(b.size for b in self.blobs) + sum(r.size for _, r in self.records)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"{verb} blob {b.name} ({b.size} bytes)" for b in self.blobs]
        out += [f"{verb} record {kind}/{r.name}" for kind, r in self.records]
        out.append(f"{verb} {len(self.blobs)} blobs and {len(self.records)} records, "
                   f"{self.bytes_freed} bytes; {self.live_blobs} blobs live")
        return out


def _digests_in(value: Any) -> Iterable[str]:
    """Every digest a JSON document names (base-image records: config, layers, gzip copies)."""
    if isinstance(value, str):
        if is_digest(value):
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _digests_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _digests_in(item)


def _ref_digests(record: dict | None) -> list[str]:
    ref = (record or {}).get("ref") or {}
    return [d for d in (ref.get("oci_digest"), ref.get("docker_digest")) if isinstance(d, str)]


def live_images(images: list[Listed], served: dict[str, float], gc: GcConfig, now: float) -> set[str]:
    """The keys of the image records that are live (see the module's docstring)."""
    keys = {entry.name: ImageKey.parse(entry.name) for entry in images}
    newest: dict[str, Listed] = {}
    for entry in images:
        key = keys[entry.name]
        if key is not None and (key.group not in newest or entry.modified > newest[key.group].modified):
            newest[key.group] = entry
    live = set()
    for entry in images:
        key = keys[entry.name]
        last_use = max(entry.modified, served.get(entry.name, 0.0))
        if now - entry.modified < gc.grace or now - last_use < gc.keep:
            live.add(entry.name)
        elif key is not None and newest[key.group] is entry:
            if not _DATE_TAG.fullmatch(key.tag) or gc.snapshots_max_age is None or now - last_use < gc.snapshots_max_age:
                live.add(entry.name)
    return live


async def _walk(store: Store, manifests: set[str]) -> set[str]:
    """`manifests` (manifests or indexes) and every blob they name, reading only manifests:
    configs and layers are named, never read (a layer may be gigabytes)."""
    live: set[str] = set()
    async for visit in walk(manifests, store.get_blob_bytes):
        live.add(visit.digest)
        if visit.problem is not None:  # the record cache rebuilds such an image; nothing here is marked
            log.warning("gc: %s is no manifest (%s); what it names is not marked", visit.digest, visit.problem)
        if visit.found is not None:  # absent: the image reads as a miss and is rebuilt
            live.update(blob.digest for blob in visit.found.blobs)
    return live


async def collect(store: Store, gc: GcConfig, *, dry_run: bool = False, now: float | None = None) -> GcReport:
    """Mark what is live, sweep the rest that is older than `gc.grace`."""
    now = time.time() if now is None else now
    report = GcReport(dry_run)
    # Blobs are listed first: one written after this listing is not swept by this run at all.
    blobs = [b async for b in store.list_blob_entries()]
    images = await store.list_record_entries(kinds.IMAGES)
    served_entries = await store.list_record_entries(kinds.SERVED)
    served = {e.name: e.modified for e in served_entries}
    live_keys = live_images(images, served, gc, now)

    roots: set[str] = set()
    for key in live_keys:
        roots.update(_ref_digests(await store.get_record(kinds.IMAGES, key)))
    for entry in served_entries:
        if now - entry.modified < gc.grace:
            roots.update(_ref_digests(await store.get_record(kinds.SERVED, entry.name)))
    expired: list[tuple[str, Listed]] = []
    for entry in await store.list_record_entries(kinds.REPLACED):  # written once, when replaced
        if now - entry.modified < gc.keep:
            roots.update(_ref_digests(await store.get_record(kinds.REPLACED, entry.name)))
        elif now - entry.modified >= gc.grace:
            expired.append((kinds.REPLACED, entry))
    live = await _walk(store, roots)
    for kind in kinds.OF_BASES:  # they name configs and layers, not manifests
        for key in await store.list_records(kind):
            live.update(_digests_in(await store.get_record(kind, key)))
    report.live_blobs = len(live)

    def old(entry: Listed) -> bool:
        return now - entry.modified >= gc.grace

    report.blobs = [b for b in blobs if b.name not in live and old(b)]
    dead_images = [(kinds.IMAGES, e) for e in images if e.name not in live_keys and old(e)]
    dead_keys = {e.name for _, e in dead_images}
    image_keys = {e.name for e in images}
    report.records = dead_images + expired
    report.records += [(kinds.SERVED, e) for e in served_entries
                       if old(e) and (e.name in dead_keys or e.name not in image_keys)]
    for entry in await store.list_record_entries(kinds.LAYERS):
        if not old(entry):  # young: kept whatever it names, so not read
            continue
        record = await store.get_record(kinds.LAYERS, entry.name) or {}
        if record.get("digest") not in live:
            report.records.append((kinds.LAYERS, entry))
    for kind in kinds.BY_BLOB:
        report.records += [(kind, e) for e in await store.list_record_entries(kind)
                           if old(e) and "sha256:" + e.name not in live]
    # A pushed environment lives while an image of its name does, and for gc.keep after its
    # (last) push: pushed and never pulled, it goes like an image nobody pulls.
    live_names = {key.name for key in map(ImageKey.parse, live_keys) if key is not None}
    report.records += [(kinds.ENVIRONMENTS, e) for e in await store.list_record_entries(kinds.ENVIRONMENTS)
                       if old(e) and now - e.modified >= gc.keep and f"env/{e.name}" not in live_names]
    if not dry_run:
        # Records first: a record never points at a blob already gone (readers check anyway).
        for kind, entry in report.records:
            await store.remove_record(kind, entry.name)
        for blob in report.blobs:
            await store.remove_blob(blob.name)
        await _prune_tags_index(store, dead_keys, image_keys - dead_keys)
    for line in report.lines()[-1:]:
        log.info("gc: %s", line)
    return report


async def _prune_tags_index(store: Store, removed: set[str], remaining: set[str]) -> None:
    """Drop from each name's tags index the tags whose last image record was removed."""
    left: dict[str, set[str]] = {}
    for key in filter(None, map(ImageKey.parse, remaining)):
        left.setdefault(key.name, set()).add(key.tag)
    for name in {key.name for key in filter(None, map(ImageKey.parse, removed))}:
        index = TagsIndex.from_record(await store.get_record(kinds.TAGS, name))
        if index is None:
            continue
        kept = {tag: at for tag, at in index.tags.items() if tag in left.get(name, set())}
        if kept != dict(index.tags):
            await store.put_record(kinds.TAGS, name, TagsIndex(kept).as_record())


async def run_every(store: Store, gc: GcConfig, metrics: Metrics) -> None:
    """`condery serve` with gc.interval > 0: a run every interval, counted in metrics.

    The first run waits one interval, so replicas started together do not all collect
    at once (they may: concurrent runs are safe, only wasteful). A failed run is logged
    and tried again at the next interval; the server goes on serving either way.
    """
    while True:
        await asyncio.sleep(gc.interval)
        try:
            report = await collect(store, gc)
        except (StorageError, OSError) as exc:
            metrics.gc_runs.labels("failed").inc()
            log.warning("gc: run failed, next in %ds: %s", gc.interval, exc)
            continue
        metrics.gc_runs.labels("ok").inc()
        metrics.gc_removed.labels("blob").inc(len(report.blobs))
        metrics.gc_removed.labels("record").inc(len(report.records))
        metrics.gc_freed_bytes.inc(report.bytes_freed)
