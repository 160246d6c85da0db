"""The builder in-process against the real fixture channel and base: single flight,
hang-ups, layer reuse, grouping under the budget, snapshots, and the limits that keep
builds from being used up (bounded queue, per-client limit, failed-solve cache, timeouts)."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from pathlib import Path

import pytest

from condery.build.service import ImageService
from condery.config import ConfigError, load_config
from condery.layers.solve import channel
from condery.oci import errors
from condery.image.names import parse_name
from condery.image.tags import Latest, Snapshot
from condery.build.state import AppState
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.gated_channel import GatedChannel, gated_channel

DAY_MS = 86_400_000


def snapshot_channel(dest: Path) -> Path:
    """Two releases a year apart, without upload times (as older channels are), so the
    snapshot solve falls back to each record's build timestamp."""
    for version, timestamp_ms in (("1.0", 1672531200000), ("2.0", 1717200000000)):  # 2023-01-01, 2024-06-01
        write_conda_package(
            dest, "condery-snap", version, "0", timestamp_ms=timestamp_ms,
            files=[PkgFile(f"share/condery-snap/{version}", version.encode())],
        )
    index_channel(dest)
    repodata_path = dest / "linux-64" / "repodata.json"
    repodata = json.loads(repodata_path.read_text())
    for records in (repodata.get("packages", {}), repodata.get("packages.conda", {})):
        for record in records.values():
            record.pop("indexed_timestamp", None)
    repodata_path.write_text(json.dumps(repodata))
    for stale in dest.glob("linux-64/repodata.json.*"):
        stale.unlink()
    return dest


@pytest.fixture
async def service(tmp_path: Path, fixture_channel: Path, base_layout: Path):
    config = load_config(
        None,
        environ={},
        channels=[str(fixture_channel), str(snapshot_channel(tmp_path / "snap"))],
        base_image=f"oci:{base_layout}:bookworm",
        storage={"backend": "filesystem", "path": str(tmp_path / "store")},
        package_cache=str(tmp_path / "pkgs"),
        layer_budget=4,
    )
    state = await AppState.open(config)
    yield ImageService(state)
    await state.close()


def counting_builds(service: ImageService) -> list[str]:
    """Record every real build the service starts (the method still runs)."""
    calls: list[str] = []
    real_build = service.pipeline.build

    async def build(job):
        calls.append(job.request.canonical_name)
        return await real_build(job)

    service.pipeline.build = build  # type: ignore[method-assign]
    return calls


async def test_concurrent_requests_share_one_build(service: ImageService) -> None:
    calls = counting_builds(service)
    request = parse_name("xz/tzdata", service.meta_packages)
    refs = await asyncio.gather(*(service.resolve(request, Latest()) for _ in range(5)))
    assert len(set(refs)) == 1
    assert calls == ["tzdata/xz"]
    # Warm: answered from the image record, no build.
    assert await service.resolve(request, Latest()) == refs[0]
    assert calls == ["tzdata/xz"]


async def test_layers_are_grouped_under_the_budget(service: ImageService) -> None:
    # budget 4 = 1 base layer + 1 environment layer + 2 for packages (python, tqdm, and the
    # libgcc stand-ins make more than 2).
    request = parse_name("python/tqdm/xz", service.meta_packages)
    ref, images = await service.build(request, Latest())
    manifest = await service.store.get_blob_bytes(ref.oci_digest)
    layers = json.loads(manifest)["layers"]
    assert len(layers) == 4
    packages = " ".join(layer.get("annotations", {}).get("org.condery.packages", "") for layer in layers)
    for name in ("python-3.11.7", "tqdm-4.54.1", "xz-5.2.5"):
        assert name in packages


async def test_snapshot_tags(service: ImageService) -> None:
    request = parse_name("condery-snap", service.meta_packages)

    async def version(reference) -> str:
        _, (image,) = await service.build(request, reference)
        return next(line for line in image.lock.splitlines() if "condery-snap" in line).split("condery-snap-")[1]

    assert (await version(Snapshot.of(date(2024, 1, 1)))).startswith("1.0-0")
    assert (await version(Snapshot.of(date(2024, 6, 1)))).startswith("2.0-0")
    assert (await version(Latest())).startswith("2.0-0")
    with pytest.raises(errors.ManifestUnknown, match="2022"):
        await service.resolve(request, Snapshot.of(date(2022, 12, 31)))  # nothing released yet

    ref = await service.resolve(request, Snapshot.of(date(2024, 1, 1)))
    assert ref == await service.resolve(request, Snapshot.of(date(2024, 1, 1)))
    assert "2024-01-01" in await service.tags(request)
    with pytest.raises(errors.ManifestUnknown, match="not ended"):
        await service.resolve(request, Snapshot.of(date(2999, 1, 1)))


# -- builds are a scarce resource ---------------------------------------------------
# These services read the fixture channel over HTTP through a gate (tests/fixtures/
# gated_channel.py): a build holds its slot until the test lets its package download go.


@pytest.fixture
def gated(fixture_channel: Path):
    with gated_channel(fixture_channel) as channel:
        yield channel


@pytest.fixture
async def make_service(tmp_path: Path, gated: GatedChannel, base_layout: Path):
    states: list[AppState] = []

    async def make(**limits) -> ImageService:
        config = load_config(
            None,
            environ={},
            channels=[gated.url],
            base_image=f"oci:{base_layout}:bookworm",
            storage={"backend": "filesystem", "path": str(tmp_path / "store")},
            package_cache=str(tmp_path / "pkgs"),
            **limits,
        )
        state = await AppState.open(config)
        states.append(state)
        service = ImageService(state)
        # Base and repodata in place, so that timings below are about the build only.
        await service.solve(parse_name("condery-hello", service.meta_packages), Latest(), "linux-64")
        return service

    yield make
    for state in states:
        await state.close()


def counting_solves(service: ImageService) -> list[str]:
    calls: list[str] = []
    real_solve = service.pipeline.solve

    async def solve(request, reference, subdir, base):
        calls.append(request.canonical_name)
        return await real_solve(request, reference, subdir, base)

    service.pipeline.solve = solve  # type: ignore[method-assign]
    return calls


async def until(condition, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    pytest.fail("condition not reached in time")


def start(service: ImageService, name: str, client: str) -> asyncio.Task:
    return asyncio.ensure_future(service.resolve(parse_name(name, service.meta_packages), Latest(), client))


async def test_client_hang_up_does_not_cancel_the_build(make_service, gated: GatedChannel) -> None:
    service = await make_service()
    builds = counting_builds(service)
    waiting = start(service, "condery-hello", "10.0.0.1")
    # Under way, not merely asked for: its package download is held at the gate.
    await until(lambda: gated.package_requests("condery-hello"))
    waiting.cancel()  # what aiohttp does to a handler whose client went away
    await asyncio.wait([waiting])
    assert service.builds.running == 1 and service.builds.waiting == 0  # building for nobody
    gated.packages.set()
    # Asking again joins the build that went on: one build, one download.
    await service.resolve(parse_name("condery-hello", service.meta_packages), Latest(), "10.0.0.2")
    assert builds == ["condery-hello"]
    assert gated.package_requests("condery-hello") == 1


async def test_full_queue_is_429_and_joining_is_free(make_service, gated: GatedChannel) -> None:
    service = await make_service(max_concurrent_builds=1, max_queued_builds=1, max_builds_per_client=10)
    running = start(service, "condery-hello", "10.0.0.1")
    await until(lambda: gated.package_requests("condery-hello"))  # holds the only slot
    queued = start(service, "condery-symlinks", "10.0.0.2")
    await until(lambda: service.builds.queued == 1)
    assert service.builds.running == 1

    with pytest.raises(errors.TooManyRequests, match="queue is full") as refused:
        await service.resolve(parse_name("zlib", service.meta_packages), Latest(), "10.0.0.3")
    assert refused.value.status == 429 and refused.value.retry_after
    # Asking for an image already building (running or queued) joins it, whoever asks.
    joined = [start(service, "condery-hello", "10.0.0.3"), start(service, "condery-symlinks", "10.0.0.4")]
    await until(lambda: service.builds.waiting == 4)  # both joins wait, neither was refused
    assert not any(task.done() for task in joined)
    assert (service.builds.running, service.builds.queued) == (1, 1)

    gated.packages.set()
    hello, symlinks, *joins = await asyncio.gather(running, queued, *joined)
    assert joins == [hello, symlinks]
    assert gated.package_requests("condery-hello") == 1
    # Room again: the refused name builds now.
    await service.resolve(parse_name("zlib", service.meta_packages), Latest(), "10.0.0.3")


async def test_per_client_limit_on_cold_builds(make_service, gated: GatedChannel) -> None:
    service = await make_service(max_concurrent_builds=1, max_queued_builds=8, max_builds_per_client=1)
    first = start(service, "condery-hello", "10.0.0.1")
    await until(lambda: service.builds.running == 1)
    with pytest.raises(errors.TooManyRequests, match="this client") as refused:
        await service.resolve(parse_name("condery-symlinks", service.meta_packages), Latest(), "10.0.0.1")
    assert refused.value.retry_after
    other = start(service, "condery-symlinks", "10.0.0.2")  # another client is not limited
    await until(lambda: service.builds.queued == 1)
    assert service.builds.builds_of("10.0.0.1") == service.builds.builds_of("10.0.0.2") == 1
    joined = start(service, "condery-symlinks", "10.0.0.1")  # joining costs nothing
    gated.packages.set()
    await asyncio.gather(first, other, joined)

    # Warm pulls are never limited: client 1 at its limit still gets a built image.
    gated.packages.clear()
    busy = start(service, "zlib", "10.0.0.1")
    await until(lambda: service.builds.builds_of("10.0.0.1") == 1)
    assert await service.resolve(parse_name("condery-hello", service.meta_packages), Latest(), "10.0.0.1")
    gated.packages.set()
    await busy


async def test_queued_build_nobody_waits_for_is_cancelled(make_service, gated: GatedChannel) -> None:
    service = await make_service(max_concurrent_builds=1, max_queued_builds=1)
    builds = counting_builds(service)
    running = start(service, "condery-hello", "10.0.0.1")
    await until(lambda: service.builds.running == 1)
    waiters = [start(service, "condery-symlinks", "10.0.0.2"), start(service, "condery-symlinks", "10.0.0.3")]
    await until(lambda: service.builds.queued == 1)
    waiters[0].cancel()  # one client hangs up: the other still waits
    await asyncio.wait([waiters[0]])  # its leaving is done once its task is
    assert service.builds.queued == 1
    waiters[1].cancel()  # the last one hangs up: the queued build goes
    await until(lambda: service.builds.queued == 0)
    # Its place in the queue is free at once.
    later = start(service, "zlib", "10.0.0.2")
    await until(lambda: service.builds.queued == 1)

    gated.packages.set()
    await asyncio.gather(running, later)
    assert sorted(builds) == ["condery-hello", "zlib"]  # condery-symlinks never started
    assert gated.package_requests("condery-symlinks") == 0
    assert await service.records.tags(parse_name("condery-symlinks", service.meta_packages)) == set()


async def test_failed_solve_is_remembered_briefly(make_service, gated: GatedChannel) -> None:
    gated.packages.set()
    service = await make_service(failed_solve_ttl=60)
    solves = counting_solves(service)
    request = parse_name("condery-hello/nothing-provides-this", service.meta_packages)
    messages = []
    for _ in range(3):
        with pytest.raises(errors.ManifestUnknown) as info:
            await service.resolve(request, Latest(), "10.0.0.1")
        messages.append(info.value.message)
    assert solves == ["condery-hello/nothing-provides-this"]  # one solve for three requests
    assert len(set(messages)) == 1 and "nothing-provides-this" in messages[0]
    # Per name and tag: other names are solved as usual.
    await service.resolve(parse_name("condery-hello", service.meta_packages), Latest(), "10.0.0.1")
    assert solves[-1] == "condery-hello"

    off = await make_service(failed_solve_ttl=0)
    solves = counting_solves(off)
    for _ in range(2):
        with pytest.raises(errors.ManifestUnknown):
            await off.resolve(request, Latest(), "10.0.0.1")
    assert len(solves) == 2


async def test_solve_timeout_is_503_and_not_remembered(make_service, gated: GatedChannel) -> None:
    service = await make_service(solve_timeout=1)
    solves = counting_solves(service)
    service.state.gateway.clear_repodata_cache(channel(gated.url))
    service.repodata.expire()  # `latest` re-reads the channel, which now hangs
    gated.repodata.clear()
    for attempt in (1, 2):
        with pytest.raises(errors.Unavailable, match="took longer than 1 s") as info:
            await service.resolve(parse_name("zlib", service.meta_packages), Latest(), "10.0.0.1")
        assert info.value.status == 503 and info.value.code == "UNAVAILABLE" and info.value.retry_after
        assert len(solves) == attempt  # a passing fault is tried again
        service.repodata.expire()


async def test_build_timeout_cancels_the_work(make_service, gated: GatedChannel) -> None:
    service = await make_service(build_timeout=1)
    with pytest.raises(errors.Unavailable, match="longer than 1 s"):
        await service.resolve(parse_name("condery-hello", service.meta_packages), Latest(), "10.0.0.1")
    # The layer build that only this image needed was cancelled with it, and the slot freed.
    assert len(service.layers.flights) == 0
    assert (service.builds.running, service.builds.queued) == (0, 0)
    gated.packages.set()
    await asyncio.sleep(1)
    assert await service.store.list_records("layers") == []


async def test_expired_latest_is_served_while_builds_are_refused(make_service, gated: GatedChannel) -> None:
    # latest_ttl 0: every `latest` record is expired, so each pull wants a re-solve.
    service = await make_service(latest_ttl=0, max_concurrent_builds=1, max_queued_builds=0)
    gated.packages.set()
    request = parse_name("condery-hello", service.meta_packages)
    built = await service.resolve(request, Latest(), "10.0.0.1")
    gated.packages.clear()
    busy = start(service, "zlib", "10.0.0.2")
    await until(lambda: service.builds.running == 1)
    # The re-solve cannot start now (429): the last good image is served (stale-if-error).
    assert await service.resolve(request, Latest(), "10.0.0.1") == built
    with pytest.raises(errors.TooManyRequests):
        await service.resolve(parse_name("condery-symlinks", service.meta_packages), Latest(), "10.0.0.1")
    gated.packages.set()
    await busy


def test_build_limit_settings() -> None:
    config = load_config(None, environ={"CONDERY_MAX_QUEUED_BUILDS": "0", "CONDERY_FAILED_SOLVE_TTL": "5"})
    assert (config.max_queued_builds, config.failed_solve_ttl, config.max_builds_per_client) == (0, 5, 2)
    with pytest.raises(ConfigError, match="max_builds_per_client"):
        load_config(None, environ={}, max_builds_per_client=0)
