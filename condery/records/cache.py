"""The whole cache policy: what keys cover, how records are written and read, when they expire.

Two kinds of records point at stored blobs:

- image records (`images/<name>/_/<tag>/<fingerprint>`): the manifests a name and tag
  resolved to. The fingerprint covers every setting that shapes the image (channels
  without credentials, platforms, prefix, each platform's base image as resolved, the
  definitions of the meta-packages the name uses, allow_package_scripts, layer_budget,
  the layer compressor)
  and the image layout version, so a configuration change can never answer with an
  image built under another one, and the same name, tag and configuration give the
  same key whatever the store holds.
- layer records (`layers/<layout>/<sha256>/<inputs>`): one package's layer. The key
  covers every input whose bytes reach the layer: the archive (sha256), where it came
  from (its URL without credentials: conda-meta names it), the prefix, the site-packages
  path for noarch python, allow_package_scripts, the compressor, and the layer layout version.
- tags index records (`tags/<name>`): the tags a name has image records for, merged in
  by every image write, so that tags/list reads one record however large the store.

Every record carries a `schema` number; a record of another schema reads as a miss and
is rebuilt, never half-trusted. Every decision is logged on `condery.cache` with its key.

Freshness (`Freshness`): a `latest` record answers for `latest_ttl` seconds counted from
when the repodata it was solved against was fetched (not from when the solve ran), a
date tag the same way until its day ended `snapshot_grace` ago, and a date record solved
after that point answers forever.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import rattler

from condery.config import Config
from condery.layers import PackageError
from condery.layers.compression import COMPRESSOR_ID, GZIP
from condery.layers.package_layer import LAYOUT_VERSION
from condery.layers.solve import channel
from condery.common.redact import redact_url
from condery.bases.resolve import BaseImage
from condery.image.names import ImageRef, ImageRequest
from condery.image.tags import Latest, Snapshot
from condery.storage import StorageError, Store

log = logging.getLogger("condery.cache")

# Bump IMAGE_LAYOUT when the images built from the same inputs change (annotations,
# config, environment layer); bump a schema when its record's fields change.
IMAGE_LAYOUT = f"image-v3+layer-{LAYOUT_VERSION}"  # v2: no ref.name annotation; v3: users, default Cmd
IMAGE_SCHEMA = 2
LAYER_SCHEMA = 2
TAGS_SCHEMA = 1
TAGS_KIND = "tags"
_INDEX_SETTLE = 0.1  # seconds between an index write and its check (a cold build takes seconds)
_INDEX_ATTEMPTS = 5  # writes of one index update before giving up (logged; the images are stored)
_COMPLETE_CACHE_ENTRIES = 100_000
RECENT_SECONDS = 2.0
RECENT_ENTRIES = 10_000
SERVED_EVERY = 3600.0  # seconds between two `served` records of one image by one process (gc)


def tag_of(reference: Latest | Snapshot) -> str:
    return "latest" if isinstance(reference, Latest) else reference.day.isoformat()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def base_fingerprint(base: BaseImage) -> str:
    """The base as resolved: its config and layers (a tag or a layout that moved gives another)."""
    return _digest({"config": base.config, "layers": [layer.digest for layer in base.layers]})


class ImageKeys:
    """Image record keys under one configuration.

    A warm pull computes its key on every request, so what changes only with the
    configuration is prepared once, and a base's fingerprint once per resolved base.
    """

    def __init__(self, config: Config) -> None:
        self._static: dict[str, Any] = {
            "layout": IMAGE_LAYOUT,
            # Credentials are no input: the same channel read with another token is the same channel.
            "channels": [redact_url(channel(c).base_url) for c in config.channels],
            "platforms": list(config.platforms),
            "prefix": config.prefix,
            "allow_package_scripts": config.allow_package_scripts,
            "layer_budget": config.layer_budget,
            # Its layers' media types and bytes (the compressor's version: layer_key).
            "layer_compression": COMPRESSOR_ID[config.layer_compression],
        }
        self._meta = {
            name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(meta).items()}
            for name, meta in config.meta_packages.items()
        }
        self._bases: dict[str, tuple[BaseImage, str]] = {}  # subdir -> (base, its fingerprint)

    def _base_fingerprint(self, subdir: str, base: BaseImage) -> str:
        known = self._bases.get(subdir)
        if known is None or known[0] is not base:
            known = self._bases[subdir] = (base, base_fingerprint(base))
        return known[1]

    def inputs(self, request: ImageRequest, bases: Mapping[str, BaseImage]) -> dict[str, Any]:
        """Every setting that shapes the image of `request` (logged on a miss, hashed into the key)."""
        return {
            **self._static,
            "bases": {subdir: self._base_fingerprint(subdir, base) for subdir, base in bases.items()},
            # Only the meta-packages this name uses: editing another one changes nothing here.
            "meta_packages": {name: self._meta[name] for name in sorted(request.meta)},
        }

    def key(self, request: ImageRequest, tag: str, bases: Mapping[str, BaseImage]) -> str:
        return image_record_key(request, tag, _digest(self.inputs(request, bases)))


def image_record_key(request: ImageRequest, tag: str, fingerprint: str) -> str:
    # "_" can never be a name component, so "<name>/_/<tag>" cannot collide with a
    # longer name, and listing "<name>/_/" gives exactly this name's tags.
    return f"{request.canonical_name}/_/{tag}/{fingerprint[:32]}"


def tags_prefix(request: ImageRequest) -> str:
    return f"{request.canonical_name}/_/"


def layer_key(record: rattler.RepoDataRecord, *, prefix: str, site_packages: str | None, allow_scripts: bool,
              bytecode: str | None = None, compression: str = GZIP) -> str:
    """A storage-safe key for the layer of `record` as this configuration builds it.

    The site-packages path counts for noarch python only, so that e.g. zlib's layer is
    shared by every python version. `bytecode` is the pyc tag ("cpython-311") the layer
    is compiled for (layers/bytecode.py bytecode_for), None when it holds no bytecode of
    ours: a build host without the image's python makes another layer, never this one.
    The compressor (algorithm, library version, level, chunk size) counts too: switching
    layer_compression never serves a layer of the other kind, and a new libdeflate never
    reuses layers it would not write the same.
    """
    if record.sha256 is None:
        # build_package_layer refuses it too; a key that cannot name the bytes is no key.
        raise PackageError(f"{record.file_name}: the channel gives no sha256, so it cannot be verified")
    inputs = {
        "url": redact_url(record.url),  # conda-meta/<dist>.json names it
        "prefix": prefix,
        "site_packages": site_packages if record.noarch.python else None,
        "allow_scripts": allow_scripts,
        "bytecode": bytecode,
        "compressor": COMPRESSOR_ID[compression],
    }
    return f"{LAYOUT_VERSION}/{record.sha256.hex()}/{_digest(inputs)[:32]}"


def group_key(member_keys: Sequence[str]) -> str:
    return "group/" + hashlib.sha256("\n".join(member_keys).encode()).hexdigest()


# -- records ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerEntry:
    """A stored layer: the record kept under its cache key."""

    key: str
    digest: str
    diff_id: str
    size: int
    packages: tuple[str, ...]

    def as_record(self) -> dict:
        return {
            "schema": LAYER_SCHEMA,
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "packages": list(self.packages),
        }

    @classmethod
    def from_record(cls, key: str, record: Mapping) -> "LayerEntry | None":
        if record.get("schema") != LAYER_SCHEMA:
            return None
        try:
            return cls(key, record["digest"], record["diff_id"], int(record["size"]), tuple(record["packages"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class ImageRecord:
    """What a name, tag and configuration resolved to, and when its data was current."""

    ref: ImageRef
    data_as_of: float  # wall clock: when the oldest repodata the solve used was fetched
    platforms: Mapping[str, Mapping[str, str]]  # "os/arch" -> oci, docker, lock_sha256
    skipped: Mapping[str, str] = field(default_factory=dict)  # conda subdir -> why it did not solve

    def as_record(self) -> dict:
        return {
            "schema": IMAGE_SCHEMA,
            "ref": self.ref.__dict__,
            "data_as_of": self.data_as_of,
            "platforms": dict(self.platforms),
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_record(cls, record: Mapping) -> "ImageRecord | None":
        if record.get("schema") != IMAGE_SCHEMA:
            return None
        try:
            return cls(
                ImageRef(**record["ref"]), float(record["data_as_of"]), dict(record["platforms"]),
                dict(record.get("skipped", {})),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class TagsIndex:
    """The tags of one name (kind `tags`, key: the canonical name) and when each was last
    written (wall clock), so that `tags/list` reads one record rather than listing every
    image record of the name."""

    tags: Mapping[str, float]

    def as_record(self) -> dict:
        return {"schema": TAGS_SCHEMA, "tags": dict(sorted(self.tags.items()))}

    @classmethod
    def from_record(cls, record: Mapping | None) -> "TagsIndex | None":
        if record is None or record.get("schema") != TAGS_SCHEMA:
            return None
        try:
            return cls({str(tag): float(at) for tag, at in record["tags"].items()})
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


# -- freshness ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Freshness:
    """When a record still answers for its tag."""

    latest_ttl: float
    snapshot_grace: float

    def final_from(self, reference: Latest | Snapshot) -> float | None:
        """The wall-clock time from which a solve of `reference` never changes (None: never)."""
        if isinstance(reference, Latest):
            return None
        return reference.exclude_newer.timestamp() + self.snapshot_grace

    def is_final(self, record: ImageRecord, reference: Latest | Snapshot) -> bool:
        final_from = self.final_from(reference)
        return final_from is not None and record.data_as_of >= final_from

    def is_fresh(self, record: ImageRecord, reference: Latest | Snapshot, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.is_final(record, reference):
            return True
        final_from = self.final_from(reference)
        if final_from is not None and now >= final_from:
            return False  # solved during the grace period, which is over: one last solve
        return now - record.data_as_of < self.latest_ttl


class RepodataClock:
    """Per channel, when its repodata was last fetched; drops what is older than the TTL.

    rattler's gateway keeps repodata in memory until told otherwise. Each channel is
    dropped on its own clock, and a solve reports the oldest fetch time among its
    channels, so that a record's age counts from the data it saw, not from the solve.
    """

    def __init__(self, gateway: rattler.Gateway, ttl: float) -> None:
        self.gateway = gateway
        self.ttl = ttl
        self._fetched_at: dict[str, float] = {}  # channel -> wall clock

    def refresh(self, channels: Sequence[str], *, force: bool = False, now: float | None = None) -> float:
        """Drop each channel's repodata older than the TTL (all of it with `force`); the
        oldest fetch time left among `channels`."""
        now = time.time() if now is None else now
        for name in channels:
            fetched = self._fetched_at.get(name)
            if force or fetched is None or now - fetched >= self.ttl:
                self.gateway.clear_repodata_cache(channel(name))
                self._fetched_at[name] = now
                log.info("repodata of %s: re-read on next use", redact_url(name))
        return min((self._fetched_at[name] for name in channels), default=now)

    def expire(self) -> None:
        """Forget every fetch time: the next solve re-reads every channel."""
        self._fetched_at.clear()


# -- the store's side --------------------------------------------------------------------
class RecordCache:
    """Image and layer records in the store, checked before they are trusted."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Images whose blobs were all seen stored, with the store's removal_generation then.
        self._complete: dict[str, int] = {}
        # Image records read or written in the last RECENT_SECONDS: a warm pull otherwise
        # reads its record from the store on every request (most of its cost). Another
        # replica's write is seen once the entry expires.
        self._recent: OrderedDict[str, tuple[float, ImageRecord]] = OrderedDict()
        self._served: dict[str, float] = {}  # image key -> monotonic time of its last `served` record
        self._index_lock = asyncio.Lock()

    def _remember(self, key: str, record: ImageRecord) -> None:
        self._recent[key] = (time.monotonic() + RECENT_SECONDS, record)
        self._recent.move_to_end(key)
        while len(self._recent) > RECENT_ENTRIES:
            self._recent.popitem(last=False)

    async def image(self, key: str, *, quiet: bool = False) -> ImageRecord | None:
        """The image record under `key`, if built and whole; `quiet` logs no miss (polling)."""
        recent = self._recent.get(key)
        if recent is not None and recent[0] > time.monotonic() \
                and self._complete.get(recent[1].ref.oci_digest) == self.store.removal_generation:
            return recent[1]
        record = await self._read_image(key, quiet)
        if record is not None:
            self._remember(key, record)
        return record

    async def _read_image(self, key: str, quiet: bool) -> ImageRecord | None:
        raw = await self.store.get_record("images", key)
        if raw is None:
            log.log(logging.DEBUG if quiet else logging.INFO, "image miss key=%s", key)
            return None
        record = ImageRecord.from_record(raw)
        if record is None:
            log.info("image miss key=%s reason=schema %s", key, raw.get("schema"))
            return None
        if not (await self._blobs_present(record.ref.oci_digest) and await self._blobs_present(record.ref.docker_digest)):
            # A blob it needs is gone (found corrupt and dropped): build again; the
            # layers still stored are reused, the missing one is rebuilt.
            log.warning("image miss key=%s reason=a blob it needs is not stored", key)
            return None
        return record

    async def put_image(self, key: str, record: ImageRecord) -> None:
        # gc keeps the image a rewrite replaces for gc.keep: clients may hold its manifest.
        previous = ImageRecord.from_record(await self.store.get_record("images", key) or {})
        if previous is not None and previous.ref != record.ref:
            replaced = f"{key}/{previous.ref.oci_digest.split(':', 1)[1]}"
            await self.store.put_record("replaced", replaced, {"ref": previous.ref.__dict__, "replaced_at": time.time()})
        await self.store.put_record("images", key, record.as_record())
        self._recent.pop(key, None)  # read back (and its blobs checked) on the next pull
        log.info("image write key=%s digest=%s", key, record.ref.oci_digest)
        head, tag, _fingerprint = key.rsplit("/", 2)  # image_record_key's "<name>/_/<tag>/<fp>"
        name = head.removesuffix("/_")
        try:
            await self._index_tags(name, {tag: time.time()})
        except StorageError as exc:
            # The image is stored and served; only its listing waits for the next write.
            log.warning("tags index of %s: not updated: %s", name, exc)

    async def note_served(self, key: str, record: ImageRecord) -> None:
        """Tell gc the image is in use: a record write at most once per SERVED_EVERY per process."""
        now = time.monotonic()
        last = self._served.get(key)
        if last is not None and now - last < SERVED_EVERY:
            return
        if len(self._served) >= RECENT_ENTRIES:
            self._served.clear()  # a memo: dropping it costs one record write per image
        self._served[key] = now
        await self.store.put_record("served", key, {"ref": record.ref.__dict__})

    async def tags(self, request: ImageRequest) -> set[str]:
        """The tags stored for a name, from its index record (one read, whatever the store holds)."""
        name = request.canonical_name
        index = TagsIndex.from_record(await self.store.get_record(TAGS_KIND, name))
        if index is not None:
            return set(index.tags)
        # A store written before the index existed (or an index of another schema): scan
        # this name's image records once and write what was found. A name with no image
        # gets no index record, so that listing unknown names cannot fill the store.
        prefix = tags_prefix(request)
        keys = await self.store.list_records("images", prefix)
        found = {rest.split("/")[0] for rest in (key[len(prefix):] for key in keys) if rest.count("/") == 1}
        if found:
            log.info("tags index of %s: built from a scan of %d image records", name, len(keys))
            now = time.time()
            found = set(await self._index_tags(name, {tag: now for tag in found}))
        return found

    async def _index_tags(self, name: str, tags: Mapping[str, float]) -> dict[str, float]:
        """Merge `tags` into the name's index; the index as written.

        Replicas share the store, which only offers last-writer-wins on a whole record, so
        a plain read-modify-write by two replicas at once could drop the tag of the one
        that wrote first. Each writer therefore re-reads after its write and merges again
        if its tags are missing, the check waiting _INDEX_SETTLE after the write. What
        remains is a narrower race: A writes and checks, and B, which read before A's
        write, writes more than _INDEX_SETTLE later, after A's check; A's tag is then missing
        from the index (not from the store: the image record is there and is served) until
        the next write for that tag. `latest` is listed whatever the index says, and a date
        tag is indexed again when its image is next written. A store with conditional
        writes (S3 If-Match) would close it; the filesystem backend has none.
        """
        # One update at a time in this process (index writes come once per build: rare),
        # so that only other replicas can contend.
        async with self._index_lock:
            return await self._merge_tags(name, tags)

    async def _merge_tags(self, name: str, tags: Mapping[str, float]) -> dict[str, float]:
        merged: dict[str, float] = {}
        for attempt in range(_INDEX_ATTEMPTS + 1):
            if attempt > 0:
                # Check after a write only once a writer that read before it has had time
                # to land its write (one store round trip); jitter, so that two contended
                # writers step out of lockstep.
                await asyncio.sleep(_INDEX_SETTLE * random.uniform(1, 1 + attempt))
            current = TagsIndex.from_record(await self.store.get_record(TAGS_KIND, name))
            merged = dict(current.tags) if current is not None else {}
            if all(merged.get(tag, -1.0) >= at for tag, at in tags.items()):
                return merged  # every tag is in, as recent as ours
            if attempt == _INDEX_ATTEMPTS:
                break
            for tag, at in tags.items():
                merged[tag] = max(at, merged.get(tag, at))
            await self.store.put_record(TAGS_KIND, name, TagsIndex(merged).as_record())
        log.warning("tags index of %s: still contended after %d writes", name, _INDEX_ATTEMPTS)
        return merged

    async def layer(self, key: str) -> LayerEntry | None:
        raw = await self.store.get_record("layers", key)
        entry = None if raw is None else LayerEntry.from_record(key, raw)
        if entry is None or await self.store.blob_info(entry.digest) is None:
            log.debug("layer miss key=%s", key)
            return None
        log.debug("layer hit key=%s digest=%s", key, entry.digest)
        return entry

    async def put_layer(self, entry: LayerEntry) -> None:
        await self.store.put_record("layers", entry.key, entry.as_record())
        log.info("layer write key=%s digest=%s size=%d", entry.key, entry.digest, entry.size)

    async def _blobs_present(self, top_digest: str) -> bool:
        """Whether every blob the image (index or manifest) reaches is stored.

        Checked once per image per process, and again after this process removed a blob:
        a warm pull costs nothing, and an image whose layer was dropped as corrupt is not
        served until it is whole again.
        """
        generation = self.store.removal_generation
        if self._complete.get(top_digest) == generation:
            return True
        pending, seen = [top_digest], set()
        while pending:
            digest = pending.pop()
            if digest in seen:
                continue
            seen.add(digest)
            try:
                document = json.loads(await self.store.get_blob_bytes(digest))
            except KeyError:
                return False
            children = [d["digest"] for d in document.get("manifests", [])]
            pending.extend(children)
            if not children:
                for blob in (document["config"]["digest"], *(layer["digest"] for layer in document["layers"])):
                    if await self.store.blob_info(blob) is None:
                        return False
        if len(self._complete) >= _COMPLETE_CACHE_ENTRIES:
            self._complete.clear()  # a memo, not a source of truth: dropping it costs a re-check
        self._complete[top_digest] = generation
        return True
