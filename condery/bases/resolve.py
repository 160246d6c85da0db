"""The base image under every conda image: fetched, verified, stored, remembered.

Spec forms (configuration key `base_image`):
- `REGISTRY/REPO:TAG@sha256:<digest>` or `REGISTRY/REPO@sha256:<digest>`: pinned, never
  asked for again once imported;
- `REGISTRY/REPO:TAG`: the stored answer is reused for `refresh` seconds (configuration
  `base_image_refresh`), then the tag is asked for again; a tag that moved is imported
  anew (a new base digest makes new image keys, records/keys.py), and when the registry cannot
  answer the last good base stays in use (stale-if-error) and is retried after
  FAILED_REFRESH_RETRY seconds;
- `oci:PATH[:TAG]`: a local OCI image layout (read on every resolve, it is local and
  small; the layer work is cached by the manifest's digest);
- `scratch`: no base at all.

Importing (fetch, verify, scan, recompress, store) is imports.py; the checks of an
untrusted manifest and config are untrusted.py; what the layers hold (glibc, accounts)
is layers/base_scan.py. The result is recorded under the record kind `base-images`, so
later resolves make no network call until a tag's refresh is due, and counts only while
every layer it names is stored whole (Store.has_blob): a truncated layer is imported
again. Registry credentials come from `auth` (auth.py: Docker config.json files).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from condery.bases.auth import RegistryAuth
from condery.bases.errors import BaseImageError
from condery.bases.imports import REGZIP_TYPES, Source, import_image, stored_accounts
from condery.bases.untrusted import OWN_LAYERS, too_many_layers
from condery.bases.upstream import ImageReference, UpstreamClient, UpstreamError
from condery.common.jsonobject import json_object
from condery.oci.layout import LayoutError, OciLayout
from condery.oci.manifest import Descriptor, FetchedManifest, ManifestError, parse_descriptor
from condery.oci.platforms import OciPlatform
from condery.records import kinds
from condery.records.schemas import SCRATCH, BaseImage
from condery.storage import Store

log = logging.getLogger("condery.base_image")

_MAX_MESSAGE = 500  # error text quotes untrusted JSON: keep the client's answer short
DEFAULT_REFRESH = 24 * 3600  # seconds a base pinned only by tag is used before asking again
# After a failed refresh, the seconds before the next attempt: soon enough to pick up the
# registry's return, rare enough that a registry that hangs does not slow every pull.
FAILED_REFRESH_RETRY = 60
REFRESH_CHECK_TIMEOUT = 10  # seconds the tag's manifest request of a refresh may take


async def resolve_base_image(
    spec: str,
    platform: OciPlatform,
    store: Store,
    session: aiohttp.ClientSession,
    *,
    layer_budget: int,
    auth: RegistryAuth | None = None,
    refresh: float = DEFAULT_REFRESH,
) -> BaseImage:
    """The base image for `platform`, imported into `store` on first use.

    `layer_budget` is the configuration's: a base may bring at most
    `layer_budget - OWN_LAYERS` layers, checked before anything is downloaded.
    `refresh`: seconds before a base pinned only by tag is asked for again.
    """
    spec = spec.strip()
    if spec == "scratch":
        return SCRATCH
    try:
        image = await _resolve(spec, platform, store, _Fetch(session, auth, refresh), layer_budget)
        if len(image.layers) > layer_budget - OWN_LAYERS:  # recorded under a larger budget
            raise too_many_layers(len(image.layers), layer_budget)
        return image
    except (BaseImageError, LayoutError, UpstreamError, ManifestError, asyncio.TimeoutError) as exc:
        # One kind of error for every broken base; the client sees what failed, the log
        # also where (a layout's path is the operator's, not the client's business).
        message = str(exc) or "timed out"
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        log.warning("%s: %s", f"base image {spec}" if spec.startswith("oci:") else describe_base(spec), message)
        raise BaseImageError(f"{describe_base(spec)}: {message}") from None


@dataclass(frozen=True)
class _Fetch:
    """How a registry base is fetched and how long a tag's answer stands."""

    session: aiohttp.ClientSession
    auth: RegistryAuth | None
    refresh: float


async def _resolve(spec: str, platform: OciPlatform, store: Store, fetch: _Fetch, layer_budget: int) -> BaseImage:
    if spec.startswith("oci:"):
        layout = OciLayout.from_spec(spec[len("oci:") :])
        # A layout can change under the same path: key the work by what it holds now.
        layout_root = await asyncio.to_thread(layout.root_manifest)
        key = _record_key(f"oci-manifest:{layout_root.digest}", platform)
        cached = await _from_record(store, key)
        if cached is not None:
            return cached[0]
        return await _import_and_record(spec, layout, layout_root, platform, store, key, layer_budget)

    ref = _parse_reference(spec)
    key = _record_key(str(ref), platform)
    source = _Registry(UpstreamClient(fetch.session, auth=fetch.auth), ref)
    cached = await _from_record(store, key)
    if ref.digest is not None:  # pinned: what the digest names never changes
        if cached is not None:
            return cached[0]
        root = await source.get_manifest(ref.digest)
        return await _import_and_record(spec, source, root, platform, store, key, layer_budget)
    if cached is None:
        root = await source.get_manifest(ref.tag or "latest")
        return await _import_and_record(spec, source, root, platform, store, key, layer_budget)

    image, record = cached
    checked_at = record.get("checked_at")
    now = time.time()
    if isinstance(checked_at, (int, float)) and 0 <= now - checked_at < fetch.refresh:
        return image
    try:
        # Bounded: a pull waits for this check, and a registry that hangs must not hold it
        # for aiohttp's connect and read timeouts; a timeout is a failed refresh.
        root = await asyncio.wait_for(source.get_manifest(ref.tag or "latest"), REFRESH_CHECK_TIMEOUT)
        if root.digest == record.get("root"):  # the tag has not moved: the stored base stands
            await store.put_record(kinds.BASE_IMAGES, key, {**record, "checked_at": now})
            return image
        refreshed = await _import_and_record(spec, source, root, platform, store, key, layer_budget)
    except (BaseImageError, LayoutError, UpstreamError, ManifestError, asyncio.TimeoutError) as exc:
        # stale-if-error: the last good base serves until the registry answers again.
        log.warning("%s: refresh failed, using the base resolved before (%s): %s",
                    describe_base(spec), record.get("manifest"), str(exc)[:_MAX_MESSAGE] or "timed out")
        retry_at = now - fetch.refresh + min(fetch.refresh, FAILED_REFRESH_RETRY)
        await store.put_record(kinds.BASE_IMAGES, key, {**record, "checked_at": retry_at})
        return image
    if refreshed.layers != image.layers or refreshed.config != image.config:
        log.info("%s for %s: the tag moved to %s", describe_base(spec), platform, root.digest)
    return refreshed


async def _import_and_record(
    spec: str, source: "Source", root: FetchedManifest, platform: OciPlatform, store: Store, key: str,
    layer_budget: int,
) -> BaseImage:
    image, record = await import_image(source, root, platform, store, layer_budget)
    # `root`: what the tag pointed at (an index or a manifest), compared at each refresh.
    record.update(spec=spec, root=root.digest, checked_at=time.time())
    await store.put_record(kinds.BASE_IMAGES, key, record)
    return image


def _parse_reference(spec: str) -> ImageReference:
    try:
        return ImageReference.parse(spec)
    except ValueError as exc:
        raise BaseImageError(str(exc)) from None


def describe_base(spec: str) -> str:
    """The base named for a client: no layout path, and nothing of a malformed reference
    (it may hold a `user:password@`, which references cannot carry)."""
    if spec.startswith("oci:"):
        return "the base image's OCI layout"
    try:
        return f"base image {ImageReference.parse(spec)}"
    except ValueError:
        return "base_image"


def _record_key(text: str, platform: OciPlatform) -> str:
    slug = "-".join(p for p in (platform.os, platform.architecture, platform.variant) if p)
    return f"{slug}/{hashlib.sha256(text.encode()).hexdigest()}"


async def _from_record(store: Store, key: str) -> tuple[BaseImage, dict[str, Any]] | None:
    """The recorded image and its record, if the record is sound and all its blobs are
    still stored."""
    record = await store.get_record(kinds.BASE_IMAGES, key)
    if record is None:
        return None
    try:
        layers = tuple(parse_descriptor(d) for d in record["layers"])
        diff_ids = tuple(record["diff_ids"])
        config_digest = record["config"]
        glibc = record.get("glibc")
        accounts = record.get("accounts")
        if accounts is not None:
            passwd, group = accounts.get("passwd"), accounts.get("group")
    except (KeyError, TypeError, AttributeError, ManifestError):
        return None  # an unreadable record is rebuilt, not trusted
    if any(layer.media_type in REGZIP_TYPES for layer in layers):
        return None  # recorded before recompression existed: import again
    if not isinstance(config_digest, str) or await store.blob_info(config_digest) is None:
        return None
    for layer in layers:
        # Sizes too: a truncated layer is removed here, so the base is imported again
        # (and every image on it rebuilt) instead of served with a layer nobody can pull.
        if not await store.has_blob(layer.digest, layer.size):
            return None
    if accounts is None:
        # Recorded before accounts were read: read them from the stored layers rather
        # than import again, which a site whose registry is out of reach could not do.
        try:
            found = await stored_accounts(store, layers)
        except (ManifestError, OSError):
            return None
        passwd, group = found.get("passwd"), found.get("group")
        record = {**record, "accounts": {"passwd": passwd, "group": group}}
        await store.put_record(kinds.BASE_IMAGES, key, record)
    try:
        config = json_object(await store.get_blob_bytes(config_digest))
    except KeyError:  # found corrupt on this first read, and dropped
        return None
    if config is None:
        return None
    return BaseImage(config, layers, diff_ids, glibc if isinstance(glibc, str) else None,
                     passwd if isinstance(passwd, str) else None, group if isinstance(group, str) else None), record


@dataclass(frozen=True)
class _Registry:
    client: UpstreamClient
    ref: ImageReference

    async def get_manifest(self, reference: str) -> FetchedManifest:
        return await self.client.get_manifest(self.ref, reference)

    async def get_small_blob(self, desc: Descriptor, limit: int) -> bytes:
        return await self.client.get_small_blob(self.ref, desc.digest, desc.size, limit)

    async def fetch_blob(self, desc: Descriptor, directory: Path) -> Path:
        return await self.client.fetch_blob(self.ref, desc.digest, desc.size, directory)


