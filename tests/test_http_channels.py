"""Channels over real HTTP: repodata and package downloads from a loopback server that
misbehaves on command (tests/fixtures/http_channel.py), private channels whose
credentials are only in rattler's auth file (tests/fixtures/token_channel.py)."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

import pytest
import rattler

from condery.build.service import ImageService
from condery.config import load_config
from condery.layers import PackageError, PackageUnavailable
from condery.layers import package_layer
from condery.layers.package_layer import build_package_layer, channel_client
from condery.layers.solve import ChannelUnavailable, SolveRequest, solve
from condery.oci import errors
from condery.image.names import parse_name
from condery.image.tags import Latest
from condery.build.state import REPODATA_RETRIES, AppState
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.http_channel import faulty_channel
from tests.fixtures.token_channel import token_channel

PREFIX = "/opt/conda"


@pytest.fixture
def channel_dir(tmp_path: Path) -> Path:
    ch = tmp_path / "ch"
    for name in ("small", "other"):
        write_conda_package(ch, name, "1.0", "h0", files=[PkgFile(f"share/{name}", secrets.token_bytes(64 << 10))])
    index_channel(ch)
    return ch


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same retry schedule, shorter (the schedule itself is checked in test_retry_waits)."""
    monkeypatch.setattr(package_layer, "DOWNLOAD_RETRY_DELAYS", (0.05, 0.1, 0.2))
    monkeypatch.setattr(package_layer, "DOWNLOAD_READ_TIMEOUT", 1.0)


@pytest.fixture
def auth_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty auth file, so that no credential of the host's (keyring, netrc) is used."""
    path = tmp_path / "credentials.json"
    path.write_text("{}")
    monkeypatch.setenv("RATTLER_AUTH_FILE", str(path))
    return path


async def solved(url: str, tmp: Path, name: str = "small") -> rattler.RepoDataRecord:
    # As AppState makes it.
    gateway = rattler.Gateway(cache_dir=tmp / "repodata", client=channel_client(max_retries=REPODATA_RETRIES))
    records = await solve(SolveRequest((name,), "linux-64"), [url], gateway, timeout=30)
    return next(r for r in records if r.name.normalized == name)


async def build(record: rattler.RepoDataRecord, tmp: Path, **kw):
    return await build_package_layer(record, python_record=None, prefix=PREFIX, platform="linux-64",
                                     work_dir=tmp / "work", package_cache_dir=tmp / "pkgs", **kw)


def assert_nothing_kept(tmp: Path) -> None:
    """No archive, partial download or staging file is left behind."""
    assert not [p for p in (tmp / "pkgs").rglob("*") if p.is_file()]
    work = tmp / "work"
    assert not work.exists() or not list(work.iterdir())


async def test_repodata_and_packages_over_http(channel_dir: Path, tmp_path: Path) -> None:
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        assert record.url.startswith("http://127.0.0.1:")
        blob = await build(record, tmp_path)
        assert blob.size > 64 << 10
        assert channel.package_requests("small") == 1
        assert any("repodata" in path for path in channel.requests)
        # A second build uses the verified archive on disk.
        await build(record, tmp_path)
        assert channel.package_requests("small") == 1


@pytest.mark.parametrize("faults", [("500",), ("reset",), ("503", "reset", "502")])
async def test_passing_faults_are_retried(channel_dir: Path, tmp_path: Path, fast_retries: None,
                                          faults: tuple[str, ...]) -> None:
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        channel.fail("small", *faults)
        await build(record, tmp_path)
        assert channel.package_requests("small") == len(faults) + 1


async def test_repodata_passing_faults_are_retried(channel_dir: Path, tmp_path: Path) -> None:
    """The solver's client retries too (rattler's own retry, REPODATA_RETRIES)."""
    with faulty_channel(channel_dir) as channel:
        channel.fail("repodata.json", "503", "reset")
        await solved(channel.url, tmp_path)
        # linux-64 and noarch are read at once: two answers, two faults among them.
        assert sum(path.endswith("/repodata.json") for path in channel.requests) == 4


async def test_retries_are_bounded(channel_dir: Path, tmp_path: Path, fast_retries: None) -> None:
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        channel.fail("small", *["500"] * 10)
        with pytest.raises(PackageUnavailable, match=r"small-1.0-h0: download failed from http://127.0.0.1:\d+"):
            await build(record, tmp_path)
        assert channel.package_requests("small") == len(package_layer.DOWNLOAD_RETRY_DELAYS) + 1 == 4
    assert_nothing_kept(tmp_path)


async def test_retry_waits(channel_dir: Path, tmp_path: Path) -> None:
    """The real schedule: 0.5 s then 1 s before the second and third attempts."""
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        channel.fail("small", "500", "500")
        loop = asyncio.get_running_loop()
        start = loop.time()
        await build(record, tmp_path)
        assert 1.5 <= loop.time() - start < 3.5
        assert channel.package_requests("small") == 3


@pytest.mark.parametrize("status", ["404", "410"])
async def test_4xx_is_not_retried(channel_dir: Path, tmp_path: Path, fast_retries: None, status: str) -> None:
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        channel.fail("small", status)
        with pytest.raises(PackageUnavailable, match=f"the channel http://127.0.0.1:\\d+ answered HTTP {status}"):
            await build(record, tmp_path)
        assert channel.package_requests("small") == 1
    assert_nothing_kept(tmp_path)


async def test_changed_bytes_are_refused(channel_dir: Path, tmp_path: Path) -> None:
    """Bytes that changed under the same URL fail the repodata's sha256: refused, nothing kept."""
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        channel.fail("small", "swap")
        with pytest.raises(PackageError, match="sha256 mismatch") as info:
            await build(record, tmp_path)
        assert not isinstance(info.value, PackageUnavailable)
        assert_nothing_kept(tmp_path)
        # The channel serves the right bytes again: the same record builds.
        await build(record, tmp_path)


@pytest.mark.parametrize("fault", ["stall", "midbody"])
async def test_stalled_download_times_out(channel_dir: Path, tmp_path: Path, fast_retries: None,
                                          fault: str) -> None:
    with faulty_channel(channel_dir) as channel:
        record = await solved(channel.url, tmp_path)
        channel.fail("small", fault)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(PackageUnavailable, match=r"small-1.0-h0: the channel http://127.0.0.1:\d+ sent nothing for 1 s"):
            await build(record, tmp_path)
        assert loop.time() - start < 5
        assert channel.package_requests("small") == 1  # a stall is not retried
        assert_nothing_kept(tmp_path)  # the partial download is gone
        await asyncio.sleep(0.5)  # whatever rattler still had in flight is cancelled, not writing
        assert_nothing_kept(tmp_path)


async def test_download_slots_and_cpu_slots_are_separate(channel_dir: Path, tmp_path: Path,
                                                         fast_retries: None) -> None:
    """A download waiting on the network holds a download slot, never a CPU slot; the
    download slots bound how many packages are fetched at once."""
    with faulty_channel(channel_dir) as channel:
        small = await solved(channel.url, tmp_path, "small")
        other = await solved(channel.url, tmp_path, "other")
        channel.fail("small", "stall")
        cpu, downloads = asyncio.Semaphore(1), asyncio.Semaphore(1)
        stalled = asyncio.ensure_future(build(small, tmp_path, download_slots=downloads, cpu_slots=cpu))
        while channel.package_requests("small") == 0:
            await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(build(other, tmp_path, download_slots=downloads, cpu_slots=cpu))
        await asyncio.sleep(0.5)
        assert channel.package_requests("other") == 0  # the one download slot is taken
        assert not cpu.locked()  # ...and the core is free
        with pytest.raises(PackageUnavailable, match="sent nothing"):
            await stalled
        await waiting
        assert channel.package_requests("other") == 1


def write_auth(path: Path, entry: dict) -> None:
    # rattler's auth file: host (without port) -> credentials.
    path.write_text(json.dumps({"127.0.0.1": entry}))


@pytest.mark.parametrize("kind", ["bearer", "basic"])
async def test_private_channel_through_the_auth_file(channel_dir: Path, tmp_path: Path, auth_file: Path,
                                                     kind: str) -> None:
    token, password = secrets.token_hex(16), secrets.token_hex(16)
    entry = {"BearerToken": token} if kind == "bearer" else {"BasicHTTP": {"username": "alice", "password": password}}
    with token_channel(channel_dir, token, "alice", password, require=kind) as channel:  # type: ignore[arg-type]
        assert token not in channel.url and password not in channel.url
        # Without credentials: the channel refuses, and the answer says so.
        with pytest.raises(ChannelUnavailable, match=r"a channel refused access \(HTTP 401\)"):
            await solved(channel.url, tmp_path)
        assert len(channel.requests) == len(set(channel.requests))  # a refusal is not retried
        write_auth(auth_file, entry)
        record = await solved(channel.url, tmp_path / "with-auth")
        await build(record, tmp_path, client=channel_client())
        assert channel.requests[-1].endswith("/linux-64/small-1.0-h0.tar.bz2")
        # The record and the layer name the channel without any credential.
        assert token not in record.url and password not in record.url


async def test_download_refused_is_not_retried(channel_dir: Path, tmp_path: Path, auth_file: Path) -> None:
    token = secrets.token_hex(16)
    with token_channel(channel_dir, token, "alice", "pw", require="bearer") as channel:
        write_auth(auth_file, {"BearerToken": token})
        record = await solved(channel.url, tmp_path)
        write_auth(auth_file, {"BearerToken": "revoked"})
        before = len(channel.requests)
        with pytest.raises(PackageUnavailable, match=r"small-1.0-h0: the channel http://127.0.0.1:\d+/channel "
                                                     r"refused access \(HTTP 401\)") as info:
            await build(record, tmp_path, client=channel_client())
        assert token not in str(info.value)
        assert len(channel.requests) == before + 1
    assert_nothing_kept(tmp_path)


def test_unreadable_auth_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "credentials.json"
    path.write_text("{not json")
    monkeypatch.setenv("RATTLER_AUTH_FILE", str(path))
    with pytest.raises(ValueError, match=r"cannot read the channel credentials \(RATTLER_AUTH_FILE\)"):
        channel_client()


async def test_stalled_channel_is_503_and_nothing_is_cached(channel_dir: Path, tmp_path: Path, base_layout: Path,
                                                            fast_retries: None) -> None:
    """Through the builder: a stalled download answers 503 UNAVAILABLE, stores nothing,
    and the next pull (the channel well again) builds."""
    with faulty_channel(channel_dir) as channel:
        config = load_config(None, environ={}, channels=[channel.url], base_image=f"oci:{base_layout}:bookworm",
                             storage={"backend": "filesystem", "path": str(tmp_path / "store")},
                             package_cache=str(tmp_path / "pkgs"))
        state = await AppState.open(config)
        try:
            service = ImageService(state)
            request = parse_name("small", service.meta_packages)
            channel.fail("small", "midbody")
            with pytest.raises(errors.Unavailable, match="small-1.0-h0: the channel .* sent nothing for 1 s") as info:
                await service.resolve(request, Latest(), "10.0.0.1")
            assert info.value.status == 503 and info.value.retry_after
            assert await state.store.list_records("layers") == []
            assert not [p for p in (tmp_path / "pkgs").rglob("*") if p.is_file()]
            await service.resolve(request, Latest(), "10.0.0.1")
            assert len(await state.store.list_records("layers")) == 1
            assert channel.package_requests("small") == 2
        finally:
            await state.close()
