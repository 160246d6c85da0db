"""Garbage collection (condery/records/gc.py) over images really built, on the filesystem store and
on S3 (SeaweedFS): after `latest` moves to a new package version, gc removes exactly the
blobs and records that only the replaced image reached, once it is older than gc.keep and
gc.grace; a dry run removes nothing; what is young or was served recently stays.

Ages are simulated by running gc with a later `now` (S3 objects cannot be backdated);
tests/test_e2e_gc.py backdates a filesystem store instead and runs `condery gc`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from condery.build.service import ImageService
from condery.config import ConfigError, GcConfig, StorageConfig, load_config
from condery.records.gc import collect
from condery.layers.archive_cache import cap_archive_cache
from condery.image.names import ImageRef, parse_name
from condery.image.tags import Latest, parse_reference
from condery.build.state import AppState
from condery.storage import Store
from condery.storage.filesystem import FilesystemStore
from tests.fixtures.seaweed import SeaweedS3
from tests.test_cache import MS_2024_03_01, SCRIPTED, TINY, add_version, tiny_channel

DAY = 24 * 3600


async def blobs_of(store: Store, ref: ImageRef) -> set[str]:
    """Every blob an image's two manifest families name, read straight from the documents."""
    found = set()
    for top in (ref.oci_digest, ref.docker_digest):
        found.add(top)
        document = json.loads(await store.get_blob_bytes(top))
        found.add(document["config"]["digest"])
        found.update(layer["digest"] for layer in document["layers"])
    return found


async def all_blobs(store: Store) -> set[str]:
    return {digest async for digest in store.list_blobs()}


async def replace_latest(service: ImageService, channel: Path) -> tuple[ImageRef, ImageRef]:
    """Build `latest` with tiny 1.0, then let it re-solve to 2.0: (replaced, current)."""
    request = parse_name(TINY, service.meta_packages)
    first = await service.resolve(request, Latest())
    add_version(channel, "2.0", MS_2024_03_01)
    service.repodata.expire()
    for key in await service.store.list_records("images"):  # expired: the next pull refreshes
        raw = await service.store.get_record("images", key)
        await service.store.put_record("images", key, {**raw, "data_as_of": raw["data_as_of"] - 10})
    service.records._recent.clear()
    await service.resolve(request, Latest())
    await service.refreshes_settled()
    service.records._recent.clear()
    second = await service.resolve(request, Latest())
    assert second != first
    return first, second


@pytest.fixture(params=["filesystem", "s3"])
async def built(request: pytest.FixtureRequest, tmp_path: Path, base_layout: Path):
    if request.param == "filesystem":
        storage = StorageConfig(backend="filesystem", path=str(tmp_path / "store"))
    else:
        seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
        storage = StorageConfig(backend="s3", bucket=seaweed.create_bucket(), endpoint_url=seaweed.endpoint_url)
    channel = tiny_channel(tmp_path / "channel")
    config = load_config(None, environ={}, channels=[str(channel)], base_image=f"oci:{base_layout}:bookworm",
                         latest_ttl=1, storage=storage, package_cache=str(tmp_path / "pkgs"))
    state = await AppState.open(config)
    try:
        service = ImageService(state)
        first, second = await replace_latest(service, channel)
        yield service, first, second
    finally:
        await state.close()


async def test_gc_removes_exactly_what_only_the_replaced_image_reached(built) -> None:
    service, first, second = built
    store = service.store
    before = await all_blobs(store)
    only_first = await blobs_of(store, first) - await blobs_of(store, second)
    assert first.oci_digest in only_first and len(only_first) >= 4  # manifests, config, tiny 1.0's layer

    # Young (within grace) or replaced within keep: nothing goes.
    assert not (await collect(store, GcConfig(keep=7 * DAY, grace=DAY))).blobs
    assert not (await collect(store, GcConfig(keep=7 * DAY, grace=DAY), now=time.time() + 2 * DAY)).blobs
    assert await all_blobs(store) == before

    later = time.time() + 2 * DAY
    dry = await collect(store, GcConfig(keep=DAY, grace=DAY), dry_run=True, now=later)
    assert {b.name for b in dry.blobs} == only_first
    assert await all_blobs(store) == before  # a dry run removes nothing
    assert any(line.startswith("would remove blob ") for line in dry.lines())

    report = await collect(store, GcConfig(keep=DAY, grace=DAY), now=later)
    assert {b.name for b in report.blobs} == only_first
    assert report.bytes_freed >= sum(b.size for b in report.blobs) > 0
    assert await all_blobs(store) == before - only_first
    removed_kinds = {kind for kind, _ in report.records}
    assert {"layers", "manifest-types", "replaced"} <= removed_kinds
    layer_digests = {(await store.get_record("layers", key))["digest"] for key in await store.list_records("layers")}
    assert layer_digests <= await all_blobs(store)  # no layer record points at a removed blob

    # The current image is whole and still served; a second run finds nothing more.
    service.records._recent.clear()
    service.records._complete.clear()
    assert await service.resolve(parse_name(TINY, service.meta_packages), Latest()) == second
    assert await blobs_of(store, second) <= await all_blobs(store)
    again = await collect(store, GcConfig(keep=DAY, grace=DAY), now=later)
    assert not again.blobs and not again.records


async def test_date_tags_live_forever_unless_snapshots_max_age(built) -> None:
    service, _, _ = built
    store = service.store
    snapshot = await service.resolve(parse_name(TINY, service.meta_packages), parse_reference("2024-06-01"))
    far = time.time() + 400 * DAY  # `latest` too unused for long: the newest record of a tag stays
    forever = await collect(store, GcConfig(keep=DAY, grace=DAY), dry_run=True, now=far)
    assert not any("/_/2024-06-01/" in r.name for kind, r in forever.records if kind == "images")
    assert not (await blobs_of(store, snapshot)) & {b.name for b in forever.blobs}
    aged = await collect(store, GcConfig(keep=DAY, grace=DAY, snapshots_max_age=30 * DAY), dry_run=True, now=far)
    swept_images = {r.name for kind, r in aged.records if kind == "images"}
    assert any("/_/2024-06-01/" in key for key in swept_images)
    assert not any("/_/latest/" in key for key in swept_images)

    # Swept for real: tags/list (the per-name index) no longer names the date.
    request = parse_name(TINY, service.meta_packages)
    assert "2024-06-01" in await service.records.tags(request)
    await collect(store, GcConfig(keep=DAY, grace=DAY, snapshots_max_age=30 * DAY), now=far)
    assert await service.records.tags(request) == {"latest"}


async def test_an_image_served_within_grace_stays(built, tmp_path: Path) -> None:
    service, first, second = built
    store = service.store
    if not isinstance(store, FilesystemStore):
        pytest.skip("blobs are backdated on disk: S3 objects cannot be")
    only_first = await blobs_of(store, first) - await blobs_of(store, second)
    for path in (store.root / "blobs").rglob("*"):  # the blobs are old, the records young
        os.utime(path, (time.time() - 3 * DAY, time.time() - 3 * DAY))
    served = await store.get_record("served", (await store.list_records("served"))[0])
    assert served["ref"]["oci_digest"] == first.oci_digest  # the first pulls served it
    # Replaced past keep, but served within grace: stays.
    later = time.time() + 120
    assert not {b.name for b in (await collect(store, GcConfig(keep=60, grace=DAY), now=later)).blobs} & only_first
    # Once the serve is older than grace too, it goes.
    report = await collect(store, GcConfig(keep=60, grace=60), now=later)
    assert {b.name for b in report.blobs} == only_first


# -- the local package archive cache, capped by size -------------------------------------------
def archive_dirs(package_cache: Path) -> set[str]:
    return {p.name for p in (package_cache / "archives").iterdir() if p.is_dir()}


async def test_the_archive_cache_stays_under_its_cap_after_builds(tmp_path: Path, base_layout: Path) -> None:
    channel = tiny_channel(tmp_path / "channel")
    pkgs = tmp_path / "pkgs"
    config = load_config(None, environ={}, channels=[str(channel)], base_image=f"oci:{base_layout}:bookworm",
                         storage={"backend": "filesystem", "path": str(tmp_path / "store")},
                         package_cache=str(pkgs), package_cache_max_size="1")
    state = await AppState.open(config)
    try:
        service = ImageService(state)
        await service.resolve(parse_name(TINY, service.meta_packages), Latest())
        tiny = archive_dirs(pkgs)
        assert len(tiny) == 1  # over the cap, but just used: a build may still read it
        hour_ago = time.time() - 3600
        for path in (pkgs / "archives").rglob("*"):
            os.utime(path, (hour_ago, hour_ago))
        await service.resolve(parse_name(SCRIPTED, service.meta_packages), Latest())
        left = archive_dirs(pkgs)
        assert len(left) == 1 and not left & tiny  # the least recently used went after the build
    finally:
        await state.close()


def test_the_cap_removes_least_recently_used_whole_directories(tmp_path: Path) -> None:
    now = time.time()
    for name, age, size in [("a", 400, 100), ("b", 900, 100), ("c", 800, 100), ("recent", 10, 100)]:
        directory = tmp_path / "archives" / name
        directory.mkdir(parents=True)
        (directory / f"{name}.conda").write_bytes(b"x" * size)
        os.utime(directory / f"{name}.conda", (now - age, now - age))
    downloading = tmp_path / "archives" / "downloading"
    downloading.mkdir()
    (downloading / ".download-1").write_bytes(b"x" * 100)
    os.utime(downloading / ".download-1", (now - 5000, now - 5000))

    assert cap_archive_cache(tmp_path, 250, now=now) == (3, 300)  # b, c, then a: oldest first
    assert archive_dirs(tmp_path) == {"recent", "downloading"}  # in use, or being written
    assert cap_archive_cache(tmp_path, 10_000, now=now) == (0, 0)
    assert cap_archive_cache(tmp_path / "nowhere", 0) == (0, 0)


def test_gc_settings_are_validated_like_the_other_keys() -> None:
    config = load_config(None, environ={"CONDERY_GC": "{keep: 60, snapshots_max_age: null}"},
                         package_cache_max_size="1GiB")
    assert config.gc == GcConfig(keep=60) and config.package_cache_max_size == 1 << 30
    with pytest.raises(ConfigError) as problems:
        load_config(None, environ={}, gc={"keep": "1d", "grace": -1, "intervall": 5, "snapshots_max_age": True})
    assert str(problems.value).splitlines() == [
        "gc.keep: expected an integer, got '1d'",
        "gc.grace: -1 is out of range (at least 0 seconds)",
        "gc.intervall: unknown key (did you mean interval?); known: grace, interval, keep, snapshots_max_age",
        "gc.snapshots_max_age: expected an integer, got True",
    ]
    with pytest.raises(ConfigError, match="^gc: expected a mapping"):
        load_config(None, environ={}, gc=7)


async def test_a_pushed_environment_lives_while_its_image_does(built) -> None:
    """An environment record goes once gc.keep has passed since its push and no live image
    has its name; one whose image is live stays (the image's newest record lives on)."""
    service, _, _ = built
    store = service.store
    channel = service.config.channels[0]
    pulled = await service.environments.push(f"channels: [{Path(channel).name}]\ndependencies: [{TINY}]\n".encode())
    unused = await service.environments.push(f"dependencies: [{TINY}]\nname: never pulled\n".encode())
    await service.resolve(await service.request_for(f"env/{pulled.id}"), Latest())
    gc = GcConfig(keep=7 * DAY, grace=DAY)
    soon = await collect(store, gc, dry_run=True, now=time.time() + 2 * DAY)
    assert not any(kind == "environments" for kind, _ in soon.records)  # younger than gc.keep
    later = await collect(store, gc, now=time.time() + 8 * DAY)
    assert [entry.name for kind, entry in later.records if kind == "environments"] == [unused.id]
    assert await store.get_record("environments", pulled.id) is not None
    assert await store.get_record("environments", unused.id) is None
