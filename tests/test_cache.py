"""The cache rules (condery/records) through the image service, against real channels,
a real base layout and a real filesystem store: every setting that shapes an image is in
its key, the same configuration gives the same digest whatever the store held, the tag
is not in the manifest, date tags, expiry and refresh off the request path, and
platforms that do not solve."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from datetime import date
from pathlib import Path

import pytest
import rattler

from condery.build.service import ImageService
from condery.records import cache
from condery.records.keys import ImageKeys
from condery.records.freshness import Freshness, RepodataClock
from condery.records.schemas import ImageRecord
from condery.records.cache import RecordCache
from condery.config import load_config
from condery.oci import errors
from condery.image.names import ImageRef, parse_name
from condery.image.tags import Latest, Snapshot
from condery.build.state import AppState
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.gated_channel import GatedChannel, gated_channel

TINY = "condery-tiny"
SCRIPTED = "condery-scripted"
MS_2024_03_01 = 1709251200000


def tiny_channel(dest: Path, versions: tuple[str, ...] = ("1.0",), subdirs: tuple[str, ...] = ("linux-64",),
                 timestamp_ms: int = MS_2024_03_01) -> Path:
    for subdir in subdirs:
        for version in versions:
            write_conda_package(dest, TINY, version, "0", subdir=subdir, timestamp_ms=timestamp_ms,
                                files=[PkgFile(f"share/{TINY}/version", version.encode())])
    # A post-link script: what it writes is in the layer only when scripts are allowed.
    write_conda_package(dest, SCRIPTED, "1.0", "0", timestamp_ms=timestamp_ms, files=[
        PkgFile(f"bin/.{SCRIPTED}-post-link.sh", b'echo ran > "$PREFIX/share-scripted-ran"\n', 0o755),
    ])
    reindex(dest)
    return dest


def reindex(channel_dir: Path) -> None:
    """Index without upload times, as older channels are: a date solve then goes by each
    record's build timestamp, which the test chooses."""
    for stale in channel_dir.glob("*/repodata.json*"):
        stale.unlink()
    index_channel(channel_dir)
    for repodata_path in channel_dir.glob("*/repodata.json"):
        repodata = json.loads(repodata_path.read_text())
        for records in (repodata.get("packages", {}), repodata.get("packages.conda", {})):
            for record in records.values():
                record.pop("indexed_timestamp", None)
        repodata_path.write_text(json.dumps(repodata))
    for stale in channel_dir.glob("*/repodata.json.*"):
        stale.unlink()


def add_version(channel_dir: Path, version: str, timestamp_ms: int) -> None:
    write_conda_package(channel_dir, TINY, version, "0", timestamp_ms=timestamp_ms,
                        files=[PkgFile(f"share/{TINY}/version", version.encode())])
    before = max(p.stat().st_mtime for p in channel_dir.glob("*/repodata.json"))
    reindex(channel_dir)
    # http.server's Last-Modified has one-second steps: make the change visible to a
    # conditional request made within the same second.
    for repodata_path in channel_dir.glob("*/repodata.json"):
        os.utime(repodata_path, (before + 2, before + 2))


class Services:
    """Image services over one store (warm) or fresh ones, each with its own settings."""

    def __init__(self, tmp: Path, defaults: dict) -> None:
        self.tmp = tmp
        self.defaults = defaults
        self.states: list[AppState] = []

    async def make(self, store: str = "store", **settings) -> ImageService:
        config = load_config(
            None, environ={},
            storage={"backend": "filesystem", "path": str(self.tmp / store)},
            package_cache=str(self.tmp / f"pkgs-{store}"),
            **{**self.defaults, **settings},
        )
        state = await AppState.open(config)
        self.states.append(state)
        return ImageService(state)

    async def digest(self, name: str = TINY, reference: Latest | Snapshot = Latest(), **settings) -> str:
        service = await self.make(**settings)
        return (await service.resolve(parse_name(name, service.meta_packages), reference)).oci_digest


@pytest.fixture
async def services(tmp_path: Path, base_layout: Path):
    made = Services(tmp_path, {
        "channels": [str(tiny_channel(tmp_path / "channel"))],
        "base_image": f"oci:{base_layout}:bookworm",
        "meta_packages": {"tools": {"specs": [TINY], "env": {"TOOL": "1"}}},
    })
    yield made
    for state in made.states:
        await state.close()


async def manifest_of(service: ImageService, digest: str) -> dict:
    return json.loads(await service.store.get_blob_bytes(digest))


async def image_env(service: ImageService, digest: str) -> dict[str, str]:
    manifest = await manifest_of(service, digest)
    config = json.loads(await service.store.get_blob_bytes(manifest["config"]["digest"]))
    return dict(item.split("=", 1) for item in config["config"]["Env"])


# -- item 1: keys cover every input -------------------------------------------------------
async def test_every_setting_that_shapes_the_image_is_in_its_key(services: Services, tmp_path: Path) -> None:
    plain = await services.digest()
    assert await services.digest() == plain  # nothing changed: the same image, no rebuild needed

    mirror = shutil.copytree(tmp_path / "channel", tmp_path / "mirror")
    changed = {
        "prefix": await services.digest(prefix="/srv/env"),
        "channels": await services.digest(channels=[str(mirror)]),
        "base_image": await services.digest(base_image="scratch"),
        # (the base layout is amd64 only: scratch for a second platform)
        "platforms": await services.digest(base_image="scratch", platforms=["linux-64", "linux-aarch64"]),
    }
    assert plain not in changed.values(), changed
    assert len(set(changed.values())) == len(changed), changed
    # Scripts change only the images of packages that have one.
    assert await services.digest(SCRIPTED, allow_package_scripts=True) != await services.digest(SCRIPTED)

    # A meta-package's definition is part of the images of the names that use it.
    tools = await services.digest("tools")
    assert await services.digest("tools", meta_packages={"tools": {"specs": [TINY], "env": {"TOOL": "2"}}}) != tools
    # ... and of no other name.
    assert await services.digest(meta_packages={"tools": {"specs": [TINY], "env": {"TOOL": "3"}}}) == plain

    # The config change is seen in the served image, and back again.
    moved = await services.make(prefix="/srv/env")
    assert (await image_env(moved, changed["prefix"]))["CONDA_PREFIX"] == "/srv/env"
    assert await services.digest() == plain


async def test_switching_layer_compression_never_mixes_layers(services: Services) -> None:
    """zstd and gzip images of one name have their own keys, layers and media types."""
    gzipped = await services.digest()
    zstd = await services.digest(layer_compression="zstd")
    assert zstd != gzipped
    service = await services.make(layer_compression="zstd")
    layers = (await manifest_of(service, zstd))["layers"]
    ours = [layer for layer in layers if "org.condery.packages" in layer.get("annotations", {})]
    assert len(ours) >= 2  # the package's and the environment's
    for layer in ours:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+zstd"
        assert (await service.store.get_blob_bytes(layer["digest"]))[:4] == b"\x28\xb5\x2f\xfd"
    # The zstd image has no Docker schema 2 form: its Docker side is the OCI manifest.
    ref = await service.resolve(parse_name(TINY, service.meta_packages), Latest())
    assert (ref.docker_digest, ref.docker_media_type) == (ref.oci_digest, ref.oci_media_type)
    # Back to gzip: the gzip image, from the cache, not a zstd layer in sight.
    assert await services.digest() == gzipped
    gz_layers = (await manifest_of(service, gzipped))["layers"]
    assert all(layer["mediaType"].endswith("tar+gzip") for layer in gz_layers)


async def test_same_configuration_same_digest_whatever_the_store_held(services: Services, tmp_path: Path) -> None:
    mirror = str(shutil.copytree(tmp_path / "channel", tmp_path / "mirror"))
    # A warm store that built the packages from another channel, and with scripts on.
    await services.digest(channels=[str(tmp_path / "channel")])
    await services.digest(SCRIPTED, channels=[mirror], allow_package_scripts=True)
    warm = await services.digest(channels=[mirror])
    fresh = await services.digest(store="fresh", channels=[mirror])
    assert warm == fresh
    assert await services.digest(SCRIPTED, channels=[mirror]) == await services.digest(
        SCRIPTED, store="fresh", channels=[mirror]
    )
    service = await services.make(channels=[mirror])
    layers = (await manifest_of(service, warm))["layers"]
    # The package layer names the mirror, not the channel the store first built it from.
    packages = [layer for layer in layers if TINY in layer.get("annotations", {}).get("org.condery.packages", "")]
    assert len(packages) == 1


async def test_a_record_of_another_schema_is_a_miss(services: Services) -> None:
    service = await services.make()
    request = parse_name(TINY, service.meta_packages)
    await service.resolve(request, Latest())
    (key,) = await service.store.list_records("images", "")
    raw = await service.store.get_record("images", key)
    await service.store.put_record("images", key, {**raw, "schema": 1})
    assert await service.records.image(key) is None
    await service.resolve(request, Latest())  # rebuilt, and written in the current schema
    assert (await service.store.get_record("images", key))["schema"] == raw["schema"]


async def test_warm_pulls_read_their_record_once_and_see_other_replicas_soon(
        services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "RECENT_SECONDS", 0.3)
    service = await services.make()
    request = parse_name(TINY, service.meta_packages)
    await service.resolve(request, Latest())
    (key,) = await service.store.list_records("images", "")
    reads = 0
    real_get_record = service.store.get_record

    async def counting_get_record(kind: str, record_key: str):  # instruments the real store
        nonlocal reads
        reads += kind == "images"
        return await real_get_record(kind, record_key)

    monkeypatch.setattr(service.store, "get_record", counting_get_record)
    first = await service.records.image(key)
    for _ in range(50):
        assert await service.records.image(key) == first
    assert reads == 1
    # Another replica on the same store writes a newer record: seen once ours expires.
    other = RecordCache(service.store)
    newer = ImageRecord(first.ref, first.data_as_of + 60, first.platforms, first.skipped)
    await other.put_image(key, newer)
    assert await service.records.image(key) == first
    await asyncio.sleep(0.35)
    assert await service.records.image(key) == newer


# -- item 5: the tag is not in the manifest --------------------------------------------------
async def test_latest_and_a_date_with_the_same_packages_have_one_digest(services: Services) -> None:
    latest = await services.digest()
    assert await services.digest(reference=Snapshot.of(date(2024, 6, 1))) == latest
    service = await services.make()
    manifest = await manifest_of(service, latest)
    assert "org.opencontainers.image.ref.name" not in manifest.get("annotations", {})


# -- item 4: date tags ------------------------------------------------------------------------
async def test_an_uncached_date_is_solved_against_fresh_repodata(services: Services, tmp_path: Path) -> None:
    service = await services.make()
    request = parse_name(TINY, service.meta_packages)
    await service.resolve(request, Latest())  # repodata loaded, and fresh for an hour
    # A build of 1.1 from 2024-04-01 uploaded now (the channel records no upload times).
    add_version(tmp_path / "channel", "1.1", 1711929600000)
    ref = await service.resolve(request, Snapshot.of(date(2024, 5, 1)))
    manifest = await manifest_of(service, ref.oci_digest)
    assert any("condery-tiny-1.1" in layer.get("annotations", {}).get("org.condery.packages", "")
               for layer in manifest["layers"])


def test_date_records_are_final_only_after_the_grace_period() -> None:
    policy = Freshness(latest_ttl=3600, snapshot_grace=2 * 86400)
    day = Snapshot.of(date(2024, 5, 1))
    end = day.exclude_newer.timestamp()

    def record(data_as_of: float) -> ImageRecord:
        return ImageRecord(ImageRef("sha256:a", "m", "sha256:b", "m"), data_as_of, {})

    # Solved an hour after the day ended: like latest, for an hour.
    early = record(end + 3600)
    assert not policy.is_final(early, day)
    assert policy.is_fresh(early, day, now=end + 3600 + 60)
    assert not policy.is_fresh(early, day, now=end + 2 * 3600)
    # Solved with data from after the grace period: forever.
    late = record(end + 2 * 86400 + 1)
    assert policy.is_final(late, day) and policy.is_fresh(late, day, now=end + 10 * 365 * 86400)
    # Solved just before the grace ended: one more solve once it has.
    edge = record(end + 2 * 86400 - 10)
    assert policy.is_fresh(edge, day, now=end + 2 * 86400 - 5)
    assert not policy.is_fresh(edge, day, now=end + 2 * 86400 + 5)
    # latest counts from the data, not the solve.
    assert not policy.is_fresh(record(0), Latest(), now=3600)
    assert policy.is_fresh(record(0), Latest(), now=3599)


def test_repodata_is_dropped_per_channel(tmp_path: Path) -> None:
    clock = RepodataClock(rattler.Gateway(cache_dir=tmp_path), ttl=100)
    a, b = str(tiny_channel(tmp_path / "a")), str(tiny_channel(tmp_path / "b"))
    assert clock.refresh([a], now=1000) == 1000
    # b is read for the first time at 1050; a's data (from 1000) is what limits the solve.
    assert clock.refresh([a, b], now=1050) == 1000
    # At 1100 a is one TTL old and re-read, b is not: the oldest data is now b's.
    assert clock.refresh([a, b], now=1100) == 1050
    assert clock.refresh([a, b], now=1120, force=True) == 1120


# -- item 3: stale-while-revalidate, stale-if-error -------------------------------------------
@pytest.fixture
def gated(tmp_path: Path):
    with gated_channel(tiny_channel(tmp_path / "served")) as channel:
        channel.packages.set()
        yield channel


async def test_an_expired_latest_is_served_at_once_and_refreshed_in_the_background(
    services: Services, gated: GatedChannel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = await services.make(channels=[gated.url], latest_ttl=1, solve_timeout=2)
    request = parse_name(TINY, service.meta_packages)
    first = await service.resolve(request, Latest())
    assert first == await service.resolve(request, Latest())  # fresh: no refresh
    assert not service._refreshes

    add_version(tmp_path / "served", "2.0", MS_2024_03_01)
    gated.repodata.clear()  # the refresh's solve waits at the channel
    service.repodata.expire()
    for record_key in await service.store.list_records("images", ""):
        raw = await service.store.get_record("images", record_key)
        await service.store.put_record("images", record_key, {**raw, "data_as_of": raw["data_as_of"] - 10})
    service.records._complete.clear()
    service.records._recent.clear()
    # Expired: answered at once with the last good image while the refresh waits.
    assert await asyncio.wait_for(service.resolve(request, Latest()), 5) == first
    assert len(service._refreshes) == 1
    assert await asyncio.wait_for(service.resolve(request, Latest()), 5) == first
    assert len(service._refreshes) == 1  # one refresh, however many pulls

    gated.repodata.set()
    await service.refreshes_settled()
    second = await service.resolve(request, Latest())
    assert second != first  # the refresh found 2.0

    # stale-if-error: the channel stops answering, the refresh times out, 2.0 stays served.
    add_version(tmp_path / "served", "3.0", MS_2024_03_01)
    gated.repodata.clear()
    service.repodata.expire()
    for record_key in await service.store.list_records("images", ""):
        raw = await service.store.get_record("images", record_key)
        await service.store.put_record("images", record_key, {**raw, "data_as_of": raw["data_as_of"] - 10})
    service.records._recent.clear()  # the records were rewritten behind the service's back
    with caplog.at_level(logging.WARNING, logger="condery.build"):
        assert await service.resolve(request, Latest()) == second
        await service.refreshes_settled()
    assert "serving the last good image" in caplog.text and "UNAVAILABLE" in caplog.text
    assert await service.resolve(request, Latest()) == second
    gated.repodata.set()


# -- item 7: platforms that do not solve ---------------------------------------------------
async def test_a_platform_that_does_not_solve_is_left_out(
    services: Services, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = await services.make(platforms=["linux-64", "linux-aarch64"], base_image="scratch")
    with caplog.at_level(logging.WARNING, logger="condery.build"):
        ref = await service.resolve(parse_name(TINY, service.meta_packages), Latest())
    index = await manifest_of(service, ref.oci_digest)
    assert ref.oci_media_type == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64"]
    assert "linux-aarch64" in caplog.text

    with pytest.raises(errors.ManifestUnknown) as refused:
        await service.resolve(parse_name("condery-nowhere", service.meta_packages), Latest())
    message = refused.value.message
    assert "linux-64:" in message and "linux-aarch64:" in message and "condery-nowhere" in message


@pytest.mark.parametrize("change", [
    {"user": {"name": "ada", "uid": 1002}}, {"user": {"name": "ada", "uid": 1001, "gid": 100}},
    {"user": {"name": "ada", "uid": 1001, "home": "/srv/ada"}}, {"entrypoint": ["tini", "--"]},
    {"labels": {"org.example.team": "ml"}}, {"cmd": ["bash"]},
])
def test_every_meta_package_setting_is_in_the_image_key(change: dict) -> None:
    """A user, entrypoint or label shapes the image (passwd, home, config): another value, another key."""
    base = {"specs": ["xz"], "user": {"name": "ada", "uid": 1001}}

    def key(settings: dict) -> str:
        config = load_config(None, environ={}, meta_packages={"dev": settings})
        return ImageKeys(config).key(parse_name("dev", config.meta_packages), "latest", {})

    assert key(base) == key(dict(base))
    assert key({**base, **change}) != key(base)
