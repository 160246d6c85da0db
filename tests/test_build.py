"""The builder in-process against the real fixture channel and base: single flight,
hang-ups, layer reuse, grouping under the budget, snapshots."""

from __future__ import annotations

import asyncio
import json
from datetime import date
from pathlib import Path

import pytest

from condery.build import ImageService
from condery.config import load_config
from condery.registry import errors
from condery.registry.names import parse_name
from condery.registry.tags import Latest, Snapshot
from condery.state import AppState
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package

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
    real_build = service.build

    async def build(request, reference, progress=None):
        calls.append(request.canonical_name)
        return await real_build(request, reference, progress)

    service.build = build  # type: ignore[method-assign]
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


async def test_client_hang_up_does_not_cancel_the_build(service: ImageService) -> None:
    request = parse_name("condery-hello", service.meta_packages)
    waiting = asyncio.ensure_future(service.resolve(request, Latest()))
    await asyncio.sleep(0.05)
    waiting.cancel()  # what aiohttp does to a handler whose client went away
    for _ in range(600):
        if await service.store.get_record("images", "condery-hello/_/latest"):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the build stopped when its only client left")


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
