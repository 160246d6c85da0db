"""The record cache: image and layer records read from the store, checked before they are
trusted, and written after the blobs they point to.

Two levels, as Nixery's builder/cache.go: a short in-process memory of image records
(a warm pull otherwise reads its record from the store on every request), then the
store. An image counts as present only when every blob it reaches is stored whole
(sizes checked against the descriptors, Store.has_blob), once per image per process
and again after this process removed a blob. Every decision is logged on
`condery.cache` with its key. Kinds, keys and schemas are kinds.py, keys.py and
schemas.py; when a record answers is freshness.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from typing import Mapping

from condery.image.names import ImageRequest
from condery.oci.references import walk
from condery.records import kinds
from condery.records.keys import ImageKey, tags_prefix
from condery.records.schemas import ImageRecord, LayerEntry, TagsIndex
from condery.storage import StorageError, Store

log = logging.getLogger("condery.cache")

_INDEX_SETTLE = 0.1  # seconds between an index write and its check (a cold build takes seconds)
_INDEX_ATTEMPTS = 5  # writes of one index update before giving up (logged; the images are stored)
_COMPLETE_CACHE_ENTRIES = 100_000
RECENT_SECONDS = 2.0
RECENT_ENTRIES = 10_000
SERVED_EVERY = 3600.0  # seconds between two `served` records of one image by one process (gc)


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
        self._settling: set[asyncio.Future[None]] = set()  # tags index checks after an image write

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
        raw = await self.store.get_record(kinds.IMAGES, key)
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
        previous = ImageRecord.from_record(await self.store.get_record(kinds.IMAGES, key) or {})
        if previous is not None and previous.ref != record.ref:
            replaced = f"{key}/{previous.ref.oci_digest.split(':', 1)[1]}"
            await self.store.put_record(kinds.REPLACED, replaced, {"ref": previous.ref.__dict__, "replaced_at": time.time()})
        await self.store.put_record(kinds.IMAGES, key, record.as_record())
        self._recent.pop(key, None)  # read back (and its blobs checked) on the next pull
        log.info("image write key=%s digest=%s", key, record.ref.oci_digest)
        parsed = ImageKey.parse(key)
        if parsed is None:  # every key is made by ImageKey: a bug, not a store fault
            raise ValueError(f"not an image key: {key!r}")
        name, tag = parsed.name, parsed.tag
        tags = {tag: time.time()}
        try:
            await self._index_tags(name, tags, settle=False)
        except StorageError as exc:
            # The image is stored and served; only its listing waits for the next write.
            log.warning("tags index of %s: not updated: %s", name, exc)
            return
        # The check that another replica's write did not drop ours waits _INDEX_SETTLE: after
        # the answer, not before it (it held every cold pull 0.1-0.2 s).
        task = asyncio.ensure_future(self._settle_tags(name, tags))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def settled(self) -> None:
        """Wait for the tags index checks that image writes left running."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)

    async def _settle_tags(self, name: str, tags: Mapping[str, float]) -> None:
        await asyncio.sleep(_INDEX_SETTLE * random.uniform(1, 2))
        try:
            await self._index_tags(name, tags)
        except StorageError as exc:
            log.warning("tags index of %s: not checked: %s", name, exc)

    async def note_served(self, key: str, record: ImageRecord) -> None:
        """Tell gc the image is in use: a record write at most once per SERVED_EVERY per process."""
        now = time.monotonic()
        last = self._served.get(key)
        if last is not None and now - last < SERVED_EVERY:
            return
        if len(self._served) >= RECENT_ENTRIES:
            self._served.clear()  # a memo: dropping it costs one record write per image
        self._served[key] = now
        await self.store.put_record(kinds.SERVED, key, {"ref": record.ref.__dict__})

    async def tags(self, request: ImageRequest) -> set[str]:
        """The tags stored for a name, from its index record (one read, whatever the store holds)."""
        name = request.canonical_name
        index = TagsIndex.from_record(await self.store.get_record(kinds.TAGS, name))
        if index is not None:
            return set(index.tags)
        # A store written before the index existed (or an index of another schema): scan
        # this name's image records once and write what was found. A name with no image
        # gets no index record, so that listing unknown names cannot fill the store.
        prefix = tags_prefix(name)
        keys = await self.store.list_records(kinds.IMAGES, prefix)
        found = {parsed.tag for parsed in map(ImageKey.parse, keys) if parsed is not None and parsed.name == name}
        if found:
            log.info("tags index of %s: built from a scan of %d image records", name, len(keys))
            now = time.time()
            found = set(await self._index_tags(name, {tag: now for tag in found}))
        return found

    async def _index_tags(self, name: str, tags: Mapping[str, float], settle: bool = True) -> dict[str, float]:
        """Merge `tags` into the name's index; the index as written (`settle` false: once,
        without the check after the write).

        Replicas share the store, which only offers last-writer-wins on a whole record, so
        a plain read-modify-write by two replicas at once could drop the tag of the one
        that wrote first. Each writer therefore re-reads after its write and merges again
        if its tags are missing, the check waiting _INDEX_SETTLE after the write. What
        remains is a narrower race: A writes and checks, and B, which read before A's
        write, writes more than _INDEX_SETTLE later, after A's check; A's tag is then missing
        from the index (not from the store: the image record is there and is served) until
        the next write for that tag. `latest` is listed whatever the index says, and a date
        tag is indexed again when its image is next written. A store with conditional
        writes (S3 If-Match) would close it; the filesystem backend has none. After an image
        write the check runs once the pull is answered (put_image): until then, a tag another
        replica wrote at the same moment may be missing (`settled` waits for the checks).
        """
        # One update at a time in this process (index writes come once per build: rare),
        # so that only other replicas can contend.
        async with self._index_lock:
            return await self._merge_tags(name, tags, settle)

    async def _merge_tags(self, name: str, tags: Mapping[str, float], settle: bool = True) -> dict[str, float]:
        merged: dict[str, float] = {}
        for attempt in range(_INDEX_ATTEMPTS + 1):
            if attempt > 0:
                # Check after a write only once a writer that read before it has had time
                # to land its write (one store round trip); jitter, so that two contended
                # writers step out of lockstep.
                await asyncio.sleep(_INDEX_SETTLE * random.uniform(1, 1 + attempt))
            current = TagsIndex.from_record(await self.store.get_record(kinds.TAGS, name))
            merged = dict(current.tags) if current is not None else {}
            if all(merged.get(tag, -1.0) >= at for tag, at in tags.items()):
                return merged  # every tag is in, as recent as ours
            if attempt == _INDEX_ATTEMPTS:
                break
            for tag, at in tags.items():
                merged[tag] = max(at, merged.get(tag, at))
            await self.store.put_record(kinds.TAGS, name, TagsIndex(merged).as_record())
            if not settle:
                return merged
        log.warning("tags index of %s: still contended after %d writes", name, _INDEX_ATTEMPTS)
        return merged

    async def layer(self, key: str) -> LayerEntry | None:
        raw = await self.store.get_record(kinds.LAYERS, key)
        entry = None if raw is None else LayerEntry.from_record(key, raw)
        if entry is None or not await self.store.has_blob(entry.digest, entry.size):
            log.debug("layer miss key=%s", key)
            return None
        log.debug("layer hit key=%s digest=%s", key, entry.digest)
        return entry

    async def put_layer(self, entry: LayerEntry) -> None:
        await self.store.put_record(kinds.LAYERS, entry.key, entry.as_record())
        # debug: an image of 300 packages wrote 300 of these; its `build ended` line counts them.
        log.debug("layer write key=%s digest=%s size=%d", entry.key, entry.digest, entry.size)

    async def _blobs_present(self, top_digest: str) -> bool:
        """Whether every blob the image (index or manifest) reaches is stored.

        Checked once per image per process, and again after this process removed a blob:
        a warm pull costs nothing, and an image whose layer was dropped as corrupt is not
        served until it is whole again. Each blob is checked against its descriptor's
        size (Store.has_blob), so a truncated one is removed now rather than found by
        the client's blob GET after the manifest was served.
        """
        generation = self.store.removal_generation
        if self._complete.get(top_digest) == generation:
            return True
        async for visit in walk([top_digest], self.store.get_blob_bytes):
            if visit.found is None:
                if visit.problem is not None:  # our own document, overwritten: rebuild it
                    log.warning("image manifest %s is unreadable (%s); the image is built again",
                                visit.digest, visit.problem)
                return False
            for child in visit.found.manifests:
                if not await self.store.has_blob(child.digest, child.size):
                    return False
            for blob in visit.found.blobs:
                # Sizes too: a truncated layer (a bad copy, a crash under another tool)
                # is dropped here, before a client is handed a manifest naming it.
                if not await self.store.has_blob(blob.digest, blob.size):
                    return False
        if len(self._complete) >= _COMPLETE_CACHE_ENTRIES:
            self._complete.clear()  # a memo, not a source of truth: dropping it costs a re-check
        self._complete[top_digest] = generation
        return True
