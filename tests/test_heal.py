"""In-process: a store that rotted heals on the next request, and never answers with a
stale or broken image, a KeyError or a 500.

Blobs in the filesystem store (`<store>/blobs/sha256/<hex>`) are rewritten by other
tools: a bad copy or a crash truncates one, an operator's restore or a bug leaves a
document that is not what its record says. Every record that names a blob (image
records, package and group layer records, base import records and their gzip
recompressions) must stop counting as present when the blob is not whole, and a record
or stored manifest that is malformed must read as a miss; the next resolve then builds
or imports again and returns the same digest (layers and manifests are reproducible),
so that a client's first pull works.

Each test builds a small image (`xz`: three package layers) through the real image
service, fixture channel, base layout and filesystem store, damages one thing, and
resolves again: in a new service over the same store (a restart) or in the same,
warm one once the store has removed the damaged blob (its `removal_generation`
moves). The outcome asserted is the digest, the rewritten record and the blobs as
files, hashed here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from condery.bases.resolve import resolve_base_image
from condery.build.service import ImageService
from condery.build.state import AppState
from condery.config import Config, load_config
from condery.image.names import ImageRef, parse_name
from condery.image.tags import Latest
from condery.oci.manifest import sha256_digest
from condery.oci.media_types import OCI_LAYER_GZIP
from condery.oci.platforms import OciPlatform
from condery.records import kinds
from condery.records.cache import RecordCache
from condery.records.keys import tags_prefix
from condery.records.schemas import LayerEntry
from condery.storage.filesystem import FilesystemStore
from tests.fixtures.upstream import Layout, make_tar, write_layout
from tests.test_base_image import LIBC_BANNER, recompress_layers
from tests.test_cache import TINY, tiny_channel

NAME = "xz"
XZ = "xz-5.2.5"
AMD64 = OciPlatform("linux", "amd64")


class Restarts:
    """Image services over one store, one at a time: `start` closes the previous one, as
    a restart of `condery serve` would (its memory of records and verified blobs goes)."""

    def __init__(self, tmp: Path, defaults: dict[str, Any]) -> None:
        self.tmp = tmp
        self.defaults = defaults
        self.state: AppState | None = None

    async def start(self, **settings: Any) -> ImageService:
        await self.stop()
        config = load_config(
            None, environ={},
            storage={"backend": "filesystem", "path": str(self.tmp / "store")},
            package_cache=str(self.tmp / "pkgs"),
            **{**self.defaults, **settings},
        )
        self.state = await AppState.open(config)
        return ImageService(self.state)

    async def stop(self) -> None:
        if self.state is not None:
            await self.state.close()
            self.state = None


@pytest.fixture
async def restarts(tmp_path: Path, fixture_channel: Path, base_layout: Path):
    made = Restarts(tmp_path, {"channels": [str(fixture_channel)], "base_image": f"oci:{base_layout}:bookworm"})
    yield made
    await made.stop()


async def resolve(service: ImageService, name: str = NAME) -> ImageRef:
    return await service.resolve(parse_name(name, service.meta_packages), Latest())


async def image_key(service: ImageService, name: str = NAME) -> str:
    (key,) = await service.store.list_records(kinds.IMAGES, tags_prefix(name))
    return key


def blob_file(service: ImageService, digest: str) -> Path:
    return Path(service.config.storage.path) / "blobs" / "sha256" / digest.split(":", 1)[1]


def file_digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def truncate(path: Path) -> None:
    """A bad copy: the first half of the file under the same name."""
    size = path.stat().st_size
    assert size > 1, path
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def manifest_doc(service: ImageService, digest: str) -> dict:
    return json.loads(blob_file(service, digest).read_bytes())


def assert_whole(service: ImageService, ref: ImageRef) -> None:
    """Every blob the image reaches (index, manifests, configs, layers) is a file of its
    descriptor's size that hashes to its digest."""

    def blob(digest: str, size: int | None = None) -> Path:
        path = blob_file(service, digest)
        assert path.is_file(), f"{digest} is not stored"
        assert file_digest(path) == digest, f"{digest} is not whole"
        assert size is None or path.stat().st_size == size, digest
        return path

    def manifest(digest: str, size: int | None = None) -> None:
        document = json.loads(blob(digest, size).read_bytes())
        for entry in document.get("manifests", []):
            manifest(entry["digest"], entry["size"])
        for entry in [document["config"], *document["layers"]] if "layers" in document else []:
            blob(entry["digest"], entry["size"])

    manifest(ref.oci_digest)
    manifest(ref.docker_digest)


async def stored_ref(service: ImageService, key: str) -> dict:
    record = await service.store.get_record(kinds.IMAGES, key)
    assert record is not None
    return record["ref"]


def layer_of(service: ImageService, ref: ImageRef, package: str) -> dict:
    """The descriptor of the layer whose packages annotation names `package`."""
    for layer in manifest_doc(service, ref.oci_digest)["layers"]:
        if any(name.startswith(package) for name in layer.get("annotations", {}).get("org.condery.packages", "").split()):
            return layer
    raise AssertionError(f"no layer of {package}")


def group_of(service: ImageService, ref: ImageRef) -> dict:
    """The descriptor of a group layer: one that carries more than one package."""
    for layer in manifest_doc(service, ref.oci_digest)["layers"]:
        if len(layer.get("annotations", {}).get("org.condery.packages", "").split()) > 1:
            return layer
    raise AssertionError("no group layer")


async def layer_record_key(service: ImageService, digest: str) -> str:
    """The key of the layer (or group) record that names `digest`."""
    found = []
    for key in await service.store.list_records(kinds.LAYERS):
        record = await service.store.get_record(kinds.LAYERS, key)
        if record is not None and record.get("digest") == digest:
            found.append(key)
    assert len(found) == 1, found
    return found[0]


async def point_image_at(service: ImageService, key: str, field: str, data: bytes) -> str:
    """Store `data` as a blob (content-addressed, so it hashes correctly) and make the
    image record's `ref.<field>` name it."""
    digest = sha256_digest(data)
    await service.store.put_blob_bytes(digest, data)
    record = await service.store.get_record(kinds.IMAGES, key)
    assert record is not None
    record["ref"][field] = digest
    await service.store.put_record(kinds.IMAGES, key, record)
    return digest


# -- stored manifests that are not manifests ------------------------------------------


@pytest.mark.parametrize("field", ["oci_digest", "docker_digest"])
@pytest.mark.parametrize("data", [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b'{"schemaVersion": 2}', id="no-config-no-layers"),
    pytest.param(b"[1, 2]", id="json-array"),
    pytest.param(b'{"manifests": "none"}', id="index-without-list"),
])
async def test_a_stored_manifest_that_is_not_a_manifest_is_rebuilt(restarts: Restarts, field: str, data: bytes) -> None:
    service = await restarts.start()
    good = await resolve(service)
    key = await image_key(service)
    bogus = await point_image_at(service, key, field, data)
    assert (await stored_ref(service, key))[field] == bogus

    service = await restarts.start()
    assert await resolve(service) == good
    assert await stored_ref(service, key) == good.__dict__  # the record is rewritten
    assert_whole(service, good)


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda d: d["config"].pop("digest"), id="config-without-digest"),
    pytest.param(lambda d: d["config"].update(digest=12345), id="config-digest-not-a-string"),
    pytest.param(lambda d: d["config"].update(size="big"), id="config-size-not-a-number"),
    pytest.param(lambda d: d["layers"][-1].update(size=-1), id="layer-size-negative"),
    pytest.param(lambda d: d["layers"][0].pop("digest"), id="layer-without-digest"),
    pytest.param(lambda d: d["layers"][0].update(digest=["sha256:" + "0" * 64]), id="layer-digest-a-list"),
    pytest.param(lambda d: d["layers"].__setitem__(1, "sha256:" + "0" * 64), id="layer-not-an-object"),
    pytest.param(lambda d: d.update(layers={"0": d["layers"][0]}), id="layers-not-a-list"),
    pytest.param(lambda d: d.update(config=None), id="config-null"),
])
async def test_a_manifest_with_malformed_entries_is_rebuilt(restarts: Restarts, spoil: Callable[[dict], None]) -> None:
    service = await restarts.start()
    good = await resolve(service)
    key = await image_key(service)
    document = manifest_doc(service, good.oci_digest)
    spoil(document)
    await point_image_at(service, key, "oci_digest", json.dumps(document).encode())

    service = await restarts.start()
    assert await resolve(service) == good
    assert await stored_ref(service, key) == good.__dict__
    assert_whole(service, good)


# -- records that are malformed -----------------------------------------------------------

DIGEST_OF_NOTHING = "sha256:" + "0" * 64


@pytest.mark.parametrize("spoil", [
    pytest.param(lambda r: r.pop("ref"), id="ref-missing"),
    pytest.param(lambda r: r.update(ref="sha256:" + "0" * 64), id="ref-a-string"),
    pytest.param(lambda r: r.update(ref=[1, 2, 3, 4]), id="ref-a-list"),
    pytest.param(lambda r: r.update(ref={}), id="ref-empty"),
    pytest.param(lambda r: r["ref"].pop("docker_digest"), id="ref-without-docker-digest"),
    pytest.param(lambda r: r["ref"].update(oci_digest=DIGEST_OF_NOTHING), id="ref-digest-of-no-blob"),
    pytest.param(lambda r: r["ref"].update(oci_digest=12345), id="ref-oci-digest-an-int"),
    pytest.param(lambda r: r["ref"].update(oci_digest="not-a-digest"), id="ref-oci-digest-malformed"),
    pytest.param(lambda r: r["ref"].update(docker_digest=12345), id="ref-docker-digest-an-int"),
    pytest.param(lambda r: r["ref"].update(docker_digest="../../x"), id="ref-docker-digest-a-path"),
    pytest.param(lambda r: r["ref"].update(extra="x"), id="ref-with-an-unknown-field"),
    pytest.param(lambda r: r.update(data_as_of="yesterday"), id="data-as-of-not-a-number"),
    pytest.param(lambda r: r.update(platforms=7), id="platforms-not-a-mapping"),
    pytest.param(lambda r: r.update(platforms={"linux/amd64": {"oci": 5, "docker": None}}), id="platform-digests-not-digests"),
])
async def test_a_malformed_image_record_is_a_miss(restarts: Restarts, spoil: Callable[[dict], None]) -> None:
    service = await restarts.start()
    good = await resolve(service)
    key = await image_key(service)
    record = await service.store.get_record(kinds.IMAGES, key)
    spoil(record)
    await service.store.put_record(kinds.IMAGES, key, record)

    service = await restarts.start()
    assert await resolve(service) == good
    assert await stored_ref(service, key) == good.__dict__
    assert_whole(service, good)


LAYER_SPOILS = [
    pytest.param(lambda r: r.pop("digest"), id="digest-missing"),
    pytest.param(lambda r: r.update(digest=DIGEST_OF_NOTHING), id="digest-of-no-blob"),
    pytest.param(lambda r: r.update(size="big"), id="size-not-a-number"),
    pytest.param(lambda r: r.update(size=-1), id="size-negative"),
    pytest.param(lambda r: r.update(size=r["size"] + 1), id="size-one-more"),
    pytest.param(lambda r: r.update(packages=5), id="packages-not-a-list"),
    pytest.param(lambda r: r.update(size=True), id="size-a-bool"),
    pytest.param(lambda r: r.update(schema="2"), id="schema-a-string"),
    pytest.param(lambda r: r.update(digest=12345), id="digest-not-a-string"),
    pytest.param(lambda r: r.update(digest="not-a-digest"), id="digest-malformed"),
    pytest.param(lambda r: r.update(diff_id="not-a-digest"), id="diff-id-malformed"),
    pytest.param(lambda r: r.update(diff_id=None), id="diff-id-null"),
]


async def spoil_layer_record(
    restarts: Restarts, which: str, spoil: Callable[[dict], None]
) -> tuple[ImageService, ImageRef, str, str]:
    """Build, spoil the package (xz's) or group layer record, drop the image record (so
    that the layer records are read again) and restart: (the new service, the image
    built before, the record's key, the layer's digest)."""
    settings = {"layer_budget": 4} if which == "group" else {}  # 4 = base + env + 2: a group of 2
    service = await restarts.start(**settings)
    good = await resolve(service)
    key = await image_key(service)
    layer = group_of(service, good) if which == "group" else layer_of(service, good, XZ)
    record_key = await layer_record_key(service, layer["digest"])
    record = await service.store.get_record(kinds.LAYERS, record_key)
    spoil(record)
    await service.store.put_record(kinds.LAYERS, record_key, record)
    await service.store.remove_record(kinds.IMAGES, key)

    service = await restarts.start(**settings)
    return service, good, record_key, layer["digest"]


@pytest.mark.parametrize("which", ["package", "group"])
@pytest.mark.parametrize("spoil", LAYER_SPOILS)
async def test_a_layer_record_with_garbage_fields_is_a_miss(
    restarts: Restarts, which: str, spoil: Callable[[dict], None]
) -> None:
    service, good, record_key, digest = await spoil_layer_record(restarts, which, spoil)
    assert await resolve(service) == good
    entry = LayerEntry.from_record(record_key, await service.store.get_record(kinds.LAYERS, record_key))
    assert entry is not None and entry.digest == digest  # rewritten, whole
    assert entry.size == blob_file(service, digest).stat().st_size and file_digest(blob_file(service, digest)) == digest
    assert_whole(service, good)


# -- truncated blobs ------------------------------------------------------------------------


@pytest.fixture
async def two_platforms(tmp_path: Path, base_layout: Path):
    """Services of a two-platform configuration (an OCI index): the tiny package exists
    for both subdirs; the base layout is amd64 only, so the base is scratch."""
    made = Restarts(tmp_path, {
        "channels": [str(tiny_channel(tmp_path / "tiny", subdirs=("linux-64", "linux-aarch64")))],
        "base_image": "scratch",
        "platforms": ["linux-64", "linux-aarch64"],
    })
    yield made
    await made.stop()


@pytest.mark.parametrize("what", ["child-manifest", "child-layer"])
async def test_a_truncated_index_child_is_rebuilt(two_platforms: Restarts, what: str) -> None:
    service = await two_platforms.start()
    good = await resolve(service, TINY)
    index = manifest_doc(service, good.oci_digest)
    assert len(index["manifests"]) == 2, index
    (child,) = [entry for entry in index["manifests"] if entry["platform"]["architecture"] == "arm64"]
    if what == "child-manifest":
        damaged = child["digest"]
    else:
        damaged = manifest_doc(service, child["digest"])["layers"][-1]["digest"]
    truncate(blob_file(service, damaged))

    service = await two_platforms.start()
    assert await resolve(service, TINY) == good
    assert file_digest(blob_file(service, damaged)) == damaged
    assert_whole(service, good)


async def test_a_removed_blob_is_rebuilt_within_the_same_process(restarts: Restarts) -> None:
    service = await restarts.start()
    good = await resolve(service)
    assert await resolve(service) == good  # warm: the image's blobs are remembered as whole
    digest = layer_of(service, good, XZ)["digest"]
    generation = service.store.removal_generation
    await service.store.remove_blob(digest)  # as a failed hash or `verify --repair` in this process does
    assert service.store.removal_generation > generation
    assert not blob_file(service, digest).exists()

    assert await resolve(service) == good  # rebuilt, not the stale image naming a missing layer
    assert file_digest(blob_file(service, digest)) == digest
    assert_whole(service, good)


@pytest.mark.parametrize("found_by", ["has_blob", "image-check"])
@pytest.mark.parametrize("layer", ["package", "base"])
async def test_a_truncated_layer_found_in_a_warm_process_heals_on_the_next_resolve(
    restarts: Restarts, base_layout: Path, layer: str, found_by: str
) -> None:
    """Truncated under a warm service, the layer is found by the size check (the store's
    own, or the image check of another RecordCache over the store, as another request's
    would be), which removes it; the warm service then builds (package) or imports
    (base) it again instead of serving an image that names it."""
    service = await restarts.start()
    good = await resolve(service)
    assert await resolve(service) == good
    descriptor = layer_of(service, good, XZ) if layer == "package" else manifest_doc(service, good.oci_digest)["layers"][0]
    if layer == "base":  # the manifest's first layer is the base layout's one layer
        assert (base_layout / "blobs" / "sha256" / descriptor["digest"].split(":", 1)[1]).is_file()
    path = blob_file(service, descriptor["digest"])
    truncate(path)
    generation = service.store.removal_generation

    if found_by == "has_blob":
        assert await service.store.has_blob(descriptor["digest"], descriptor["size"]) is False
    else:  # RecordCache._blobs_present: every blob of the image, sizes against descriptors
        assert await RecordCache(service.store).image(await image_key(service)) is None
    assert not path.exists() and service.store.removal_generation > generation

    assert await resolve(service) == good
    assert file_digest(path) == descriptor["digest"] and path.stat().st_size == descriptor["size"]
    assert_whole(service, good)


@pytest.mark.parametrize("layer", ["package", "base", "group", "config"])
async def test_a_truncated_blob_heals_on_the_first_resolve_after_a_restart(
    restarts: Restarts, base_layout: Path, layer: str
) -> None:
    settings = {"layer_budget": 4} if layer == "group" else {}
    service = await restarts.start(**settings)
    good = await resolve(service)
    document = manifest_doc(service, good.oci_digest)
    descriptor = {"package": lambda: layer_of(service, good, XZ), "base": lambda: document["layers"][0],
                  "group": lambda: group_of(service, good), "config": lambda: document["config"]}[layer]()
    path = blob_file(service, descriptor["digest"])
    truncate(path)
    base_records = {key: await service.store.get_record(kinds.BASE_IMAGES, key)
                    for key in await service.store.list_records(kinds.BASE_IMAGES)}

    service = await restarts.start(**settings)
    assert await resolve(service) == good
    assert file_digest(path) == descriptor["digest"]
    assert_whole(service, good)
    if layer == "base":  # imported again from the layout, and recorded again
        after = {key: await service.store.get_record(kinds.BASE_IMAGES, key) for key in base_records}
        assert all(after[key]["checked_at"] > base_records[key]["checked_at"] for key in base_records)


async def test_bit_rot_of_the_same_size_is_found_by_the_first_read_and_rebuilt(restarts: Restarts) -> None:
    service = await restarts.start()
    good = await resolve(service)
    descriptor = layer_of(service, good, XZ)
    path = blob_file(service, descriptor["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    service = await restarts.start()
    # Sizes match, so the image check passes and the image is served (the hash is the
    # first read's: a stat per blob is what every first pull can afford).
    assert await resolve(service) == good
    with pytest.raises(KeyError):  # the first read hashes, finds the rot, removes the blob
        await service.store.get_blob_bytes(descriptor["digest"])
    assert not path.exists()
    assert await resolve(service) == good  # the removal moved the generation: rebuilt
    assert file_digest(path) == descriptor["digest"]
    assert_whole(service, good)


# -- base imports ------------------------------------------------------------------------------


@pytest.fixture
def tar_base(tmp_path: Path) -> Layout:
    """A base whose second layer is stored uncompressed: imported as a gzip recompression
    (kind base-gzip-layers), which a Docker manifest can carry."""
    tars = [make_tar({"lib/x86_64-linux-gnu/libc.so.6": LIBC_BANNER}), make_tar({"etc/motd": b"hello\n" * 2000})]
    layout = write_layout(tmp_path / "tar-base", tars, tag="v1")
    recompress_layers(layout.path, "v1", ["gzip", "tar"])
    return layout


@pytest.mark.parametrize("records", ["base-record-kept", "base-record-dropped"])
async def test_a_truncated_recompressed_base_layer_is_made_again(
    tmp_path: Path, tar_base: Layout, session, records: str
) -> None:
    """With the base record kept, its own size check (bases/resolve.py _from_record)
    catches it; with it dropped, the gzip record's (bases/imports.py _regzip) must."""
    store = FilesystemStore(tmp_path / "store")
    spec = f"oci:{tar_base.path}:v1"
    budget = Config.layer_budget
    image = await resolve_base_image(spec, AMD64, store, session, layer_budget=budget)
    gzipped = image.layers[1]
    assert gzipped.media_type == OCI_LAYER_GZIP
    assert len(await store.list_records(kinds.BASE_GZIP_LAYERS)) == 1
    path = store.root / "blobs" / "sha256" / gzipped.digest.split(":", 1)[1]
    truncate(path)
    if records == "base-record-dropped":
        for key in await store.list_records(kinds.BASE_IMAGES):
            await store.remove_record(kinds.BASE_IMAGES, key)

    store = FilesystemStore(tmp_path / "store")  # a new process: nothing trusted yet
    assert await resolve_base_image(spec, AMD64, store, session, layer_budget=budget) == image
    assert path.stat().st_size == gzipped.size and file_digest(path) == gzipped.digest
    assert sha256_digest(gzip.decompress(path.read_bytes())) == image.diff_ids[1]
