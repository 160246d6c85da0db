"""The image service's contract: whatever fails underneath, only the spec's errors come out.

Like CNCF Distribution's storage driver suite, one set of cases run against the real
service with a failure injected at each boundary, each with a real part broken rather
than replaced: a channel whose directory disappears, an HTTP channel answering 500, a
store on a full tmpfs, a broken OCI layout as base, a package whose bytes are not the
ones its repodata names, a channel that stops answering (a gate, not a timer). A
definitive "no" is 404 MANIFEST_UNKNOWN; a passing fault is 503 UNAVAILABLE with a
Retry-After; nothing else, and never an exception the registry has not mapped.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from condery.build.service import ImageService
from condery.config import load_config
from condery.oci import errors
from condery.image.names import parse_name
from condery.image.tags import Latest
from condery.build.state import AppState
from tests.fixtures.disk import fill, tmpfs
from tests.fixtures.http_channel import FaultyChannel, faulty_channel
from tests.fixtures.gated_channel import GatedChannel, gated_channel
from tests.test_cache import TINY, tiny_channel

NOT_FOUND = (404, "MANIFEST_UNKNOWN")
UNAVAILABLE = (503, "UNAVAILABLE")


@pytest.fixture
async def make(tmp_path: Path, base_layout: Path):
    states: list[AppState] = []

    async def make(channels: list[str], store: Path | None = None, **settings) -> ImageService:
        config = load_config(
            None, environ={}, channels=channels,
            base_image=settings.pop("base_image", f"oci:{base_layout}:bookworm"),
            storage={"backend": "filesystem", "path": str(store or tmp_path / "store")},
            package_cache=str(tmp_path / "pkgs"), **settings,
        )
        state = await AppState.open(config)
        states.append(state)
        return ImageService(state)

    yield make
    for state in states:
        await state.close()


async def outcome(service: ImageService, name: str, tmp_path: Path) -> tuple[int, str]:
    """The answer to a pull of NAME:latest: (200, digest) or the registry error's (status, code).

    Any other exception fails the test: it would be a 500.
    """
    try:
        ref = await service.resolve(parse_name(name, service.meta_packages), Latest(), "10.0.0.1")
    except errors.RegistryError as exc:
        assert str(tmp_path) not in exc.message, exc.message  # no server path to the client
        if exc.status == 503:
            assert exc.retry_after and exc.message, exc
        return exc.status, exc.code
    return 200, ref.oci_digest


@pytest.fixture
def channel_dir(tmp_path: Path) -> Path:
    return tiny_channel(tmp_path / "channel")


async def test_unsatisfiable_is_404(make, channel_dir: Path, tmp_path: Path) -> None:
    service = await make([str(channel_dir)])
    assert await outcome(service, "condery-nothing-provides-this", tmp_path) == NOT_FOUND
    assert await outcome(service, f"{TINY}.gt.9", tmp_path) == NOT_FOUND


async def test_channel_directory_gone_is_503_and_built_images_stay(make, channel_dir: Path, tmp_path: Path) -> None:
    service = await make([str(channel_dir)])
    status, built = await outcome(service, TINY, tmp_path)
    assert status == 200
    shutil.rmtree(channel_dir)
    service.repodata.expire()
    assert await outcome(service, "condery-scripted", tmp_path) == UNAVAILABLE
    assert await outcome(service, TINY, tmp_path) == (200, built)  # warm pulls go on


@pytest.fixture
def http_channel(channel_dir: Path) -> Iterator[FaultyChannel]:
    with faulty_channel(channel_dir) as channel:
        yield channel


async def test_channel_answering_500_is_503(make, http_channel: FaultyChannel, tmp_path: Path) -> None:
    http_channel.broken.add("repodata")
    service = await make([http_channel.url])
    assert await outcome(service, TINY, tmp_path) == UNAVAILABLE
    assert http_channel.failed
    http_channel.broken.clear()  # a passing fault: the next pull works
    assert (await outcome(service, TINY, tmp_path))[0] == 200


async def test_package_download_failing_is_503(make, http_channel: FaultyChannel, tmp_path: Path) -> None:
    http_channel.broken.add("packages")
    service = await make([http_channel.url])
    assert await outcome(service, TINY, tmp_path) == UNAVAILABLE
    assert any(path.endswith(".tar.bz2") for path in http_channel.failed)
    http_channel.broken.clear()
    assert (await outcome(service, TINY, tmp_path))[0] == 200


async def test_refused_package_is_404(make, channel_dir: Path, tmp_path: Path) -> None:
    # The channel names other bytes than it serves: a verdict on the package, not a fault.
    repodata_path = channel_dir / "linux-64" / "repodata.json"
    repodata = json.loads(repodata_path.read_text())
    (record,) = [r for fn, r in repodata["packages"].items() if fn.startswith(TINY)]
    record["sha256"] = "ab" * 32
    repodata_path.write_text(json.dumps(repodata))
    service = await make([str(channel_dir)])
    assert await outcome(service, TINY, tmp_path) == NOT_FOUND


async def test_store_failing_is_503(make, channel_dir: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        service = await make([str(channel_dir)], store=mnt / "store")
        fill(mnt)
        assert await outcome(service, TINY, tmp_path) == UNAVAILABLE


async def test_base_failing_is_503_and_the_last_good_base_stands_in(
    make, channel_dir: Path, tmp_path: Path, base_layout: Path
) -> None:
    broken = tmp_path / "broken-layout"
    (broken / "blobs" / "sha256").mkdir(parents=True)
    (broken / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (broken / "index.json").write_text("{ not json")
    service = await make([str(channel_dir)], base_image=f"oci:{broken}:bookworm")
    assert await outcome(service, TINY, tmp_path) == UNAVAILABLE

    # A layout that breaks after this process used it: the last good base stands in.
    layout = Path(shutil.copytree(base_layout, tmp_path / "layout"))
    service = await make([str(channel_dir)], store=tmp_path / "store2", base_image=f"oci:{layout}:bookworm")
    status, built = await outcome(service, TINY, tmp_path)
    assert status == 200
    (layout / "index.json").write_text("{ not json")
    service.bases.recheck()
    assert await outcome(service, TINY, tmp_path) == (200, built)


@pytest.fixture
def gated(channel_dir: Path) -> Iterator[GatedChannel]:
    with gated_channel(channel_dir) as channel:
        yield channel


async def test_timeouts_are_503(make, gated: GatedChannel, tmp_path: Path) -> None:
    gated.repodata.clear()  # the channel stops answering: the solve times out
    service = await make([gated.url], solve_timeout=1)
    assert await outcome(service, TINY, tmp_path) == UNAVAILABLE

    gated.repodata.set()  # repodata again, but the package download hangs: the build times out
    service = await make([gated.url], store=tmp_path / "store2", build_timeout=2)
    assert await outcome(service, TINY, tmp_path) == UNAVAILABLE
    gated.packages.set()
