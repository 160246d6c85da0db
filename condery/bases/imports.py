"""Importing a base image into the store: fetch, verify, scan, recompress, store.

Every blob is verified against its digest and size before it is stored, layers are
also checked against the config's diff_ids while they are decompressed, and nothing is
stored unless the whole image verified. Uncompressed and zstd layers are recompressed
to gzip once (layers/recompress.py) and recorded by the source layer's digest under
`base-gzip-layers`; its diff_id is checked against the config's before it is used.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Protocol

from condery.bases.errors import BaseImageError
from condery.bases.untrusted import MAX_CONFIG_SIZE, checked_config, distinct_layers, parse_image_manifest
from condery.layers.base_scan import MAX_BASE_UNPACKED_SIZE, LayerScan, scan_layer
from condery.layers.recompress import gzip_layer
from condery.oci.manifest import Descriptor, FetchedManifest, ManifestError, manifest_json, parse_descriptor, quoted
from condery.oci.media_types import INDEX_TYPES, MANIFEST_TYPES, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD
from condery.oci.platforms import OciPlatform
from condery.oci.references import references, select_platform
from condery.records import kinds
from condery.records.schemas import BaseImage
from condery.storage import Store

# Layer types a Docker manifest cannot carry; gzip (also non-distributable) passes as is.
REGZIP_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_ZSTD})


class Source(Protocol):
    """Where a base is imported from: an upstream registry or a local layout."""

    async def get_manifest(self, reference: str) -> FetchedManifest: ...
    async def get_small_blob(self, desc: Descriptor, limit: int) -> bytes: ...
    async def fetch_blob(self, desc: Descriptor, directory: Path) -> Path: ...




async def import_image(
    source: Source, root: FetchedManifest, platform: OciPlatform, store: Store, layer_budget: int
) -> tuple[BaseImage, dict[str, Any]]:
    manifest = root
    if manifest.media_type in INDEX_TYPES:
        child = select_platform(references(manifest.data).manifests, platform)
        if child is None:
            raise ManifestError(f"the image index has no manifest for {platform}")
        manifest = await source.get_manifest(child.digest)
    if manifest.media_type not in MANIFEST_TYPES:
        raise ManifestError(f"unsupported manifest type {quoted(manifest.media_type)}")
    doc = manifest_json(manifest.data, "manifest")
    config_desc, layers = parse_image_manifest(doc, layer_budget)

    config_bytes = await source.get_small_blob(config_desc, MAX_CONFIG_SIZE)
    config = manifest_json(config_bytes, "image config")
    diff_id_of = checked_config(config, layers, platform)

    # Stage every distinct layer first: nothing reaches the store unless all of it
    # verified. Each blob is staged once, so the work directory holds each at most once.
    try:
        work = tempfile.TemporaryDirectory(prefix="condery-base-")
    except OSError as exc:
        raise BaseImageError(f"cannot stage the base image's layers: {exc.strerror}") from None
    with work as tmp:
        staged, scans, regzipped = await _stage(source, store, layers, diff_id_of, Path(tmp))
        await store.put_blob_bytes(config_desc.digest, config_bytes)
        for digest, staged_path in staged.items():
            await store.put_blob_file(digest, staged_path)
    for source_digest, gzipped in regzipped.items():  # after their blobs: a record never dangles
        await store.put_record(kinds.BASE_GZIP_LAYERS, _gzip_record_key(source_digest), gzipped.to_json())
    glibc: str | None = None
    accounts: dict[str, str | None] = {}
    for layer in layers:  # in the image's order: the last layer with evidence wins
        glibc = scans[layer.digest].glibc_version or glibc
        accounts.update(scans[layer.digest].accounts)  # a whiteout in a later layer is None

    diff_ids = tuple(diff_id_of[layer.digest] for layer in layers)
    # The config's diff_ids stay as they are: recompression keeps every uncompressed tar.
    layers = tuple(regzipped.get(layer.digest, layer) for layer in layers)
    image = BaseImage(config, layers, diff_ids, glibc, accounts.get("passwd"), accounts.get("group"))
    record = {
        "accounts": {"passwd": image.passwd, "group": image.group},
        "manifest": manifest.digest,
        "config": config_desc.digest,
        "layers": [layer.to_json() for layer in layers],
        "diff_ids": list(diff_ids),
        "glibc": glibc,
    }
    return image, record


async def _stage(
    source: Source, store: Store, layers: tuple[Descriptor, ...], diff_id_of: Mapping[str, str], directory: Path
) -> tuple[dict[str, Path], dict[str, LayerScan], dict[str, Descriptor]]:
    """Fetch (or copy from the store) and scan each distinct layer once.

    Returns the staged files of the blobs the store lacks, every layer's scan, and the
    gzip descriptor of each layer (by source digest) a Docker manifest cannot carry.
    """
    staged: dict[str, Path] = {}
    scans: dict[str, LayerScan] = {}
    regzipped: dict[str, Descriptor] = {}
    unpacked_room = MAX_BASE_UNPACKED_SIZE
    for layer in distinct_layers(layers):
        # Whole, or not at all: a truncated copy is removed here and fetched again.
        present = await store.has_blob(layer.digest, layer.size)
        try:
            path = await (copy_from_store(store, layer.digest, directory) if present
                          else source.fetch_blob(layer, directory))
        except OSError as exc:  # the work directory (a full /tmp), not the source
            raise BaseImageError(f"cannot stage layer {layer.digest}: {exc.strerror}") from None
        scan = await asyncio.to_thread(scan_layer, path, unpacked_room)
        unpacked_room -= scan.size
        if scan.diff_id != diff_id_of[layer.digest]:
            raise ManifestError(
                f"layer {layer.digest} unpacks to {scan.diff_id}, the config says {diff_id_of[layer.digest]}"
            )
        scans[layer.digest] = scan
        if layer.media_type in REGZIP_TYPES:
            gzipped, gz_path = await _regzip(store, layer, path, scan.diff_id, directory)
            regzipped[layer.digest] = gzipped
            if gz_path is not None:
                staged[gzipped.digest] = gz_path
            path.unlink()  # only the gzip stream is stored and served
        elif present:
            path.unlink()
        else:
            staged[layer.digest] = path
    return staged, scans, regzipped


def _gzip_record_key(source_digest: str) -> str:
    return source_digest.removeprefix("sha256:")


async def _regzip(
    store: Store, layer: Descriptor, path: Path, diff_id: str, directory: Path
) -> tuple[Descriptor, Path | None]:
    """The gzip descriptor of a tar or zstd layer, and its staged file unless stored.

    A recorded recompression whose blob is still stored is reused; otherwise the layer
    is recompressed here (deterministically, so a lost blob comes back the same).
    """
    record = await store.get_record(kinds.BASE_GZIP_LAYERS, _gzip_record_key(layer.digest))
    if record is not None:
        try:
            recorded = parse_descriptor(record)
        except ManifestError:
            recorded = None  # an unreadable record is redone, not trusted
        if (recorded is not None and recorded.media_type == OCI_LAYER_GZIP
                and await store.has_blob(recorded.digest, recorded.size)):
            return recorded, None
    out = Path(tempfile.mkstemp(dir=directory, prefix="regzip-")[1])
    try:
        blob = await asyncio.to_thread(gzip_layer, path, out)
    except OSError as exc:
        out.unlink(missing_ok=True)
        raise BaseImageError(f"cannot recompress layer {layer.digest}: {exc.strerror}") from None
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    if blob.diff_id != diff_id:  # the stream we will serve must unpack to what the config says
        out.unlink(missing_ok=True)
        raise ManifestError(f"layer {layer.digest} recompressed unpacks to {blob.diff_id}, the config says {diff_id}")
    return Descriptor(OCI_LAYER_GZIP, blob.digest, blob.size), out


async def stored_accounts(store: Store, layers: tuple[Descriptor, ...]) -> dict[str, str | None]:
    """etc/passwd and etc/group as the stored layers leave them (the last layer wins)."""
    accounts: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="condery-base-") as tmp:
        for layer in layers:
            path = await copy_from_store(store, layer.digest, Path(tmp))
            try:
                accounts.update((await asyncio.to_thread(scan_layer, path)).accounts)
            finally:
                path.unlink()
    return accounts


async def copy_from_store(store: Store, digest: str, directory: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix="stored-")
    with os.fdopen(fd, "wb") as handle:
        async for chunk in store.read_blob(digest):
            await asyncio.to_thread(handle.write, chunk)
    return Path(name)


