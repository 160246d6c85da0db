"""Base images: from a real registry (with and without token auth), a local layout, scratch.

Upstreams are real CNCF Distribution processes (tests/fixtures/upstream.py); the hostile
cases that Distribution would never produce (a manifest that does not match its pin, an
oversized manifest) come from a small aiohttp server that lies on purpose.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from condery.config import Config
from condery.records.kinds import BASE_GZIP_LAYERS as GZIP_RECORD_KIND, BASE_IMAGES as RECORD_KIND
from condery.bases.untrusted import MAX_BASE_SIZE, checked_config, distinct_layers, parse_image_manifest
from condery.bases.errors import BaseImageError
from condery.oci.layout import LayoutError, OciLayout
from condery.bases.resolve import resolve_base_image
from condery.oci.references import references, select_platform
from condery.layers.recompress import gzip_layer
from condery.layers.base_scan import scan_layer
from condery.records.schemas import SCRATCH
from condery.oci.media_types import (
    DOCKER_LAYER_GZIP,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from condery.oci.manifest import Descriptor, ManifestError, docker_manifest, sha256_digest
from condery.oci.platforms import OciPlatform
from condery.bases.upstream import (
    ImageReference,
    UpstreamError,
    base_url,
    is_loopback_host,
    parse_bearer_challenge,
)
from condery.storage.filesystem import FilesystemStore
from tests.fixtures.base_image import glibc_base_layout
from tests.fixtures.upstream import (
    Layout,
    Registry,
    gzip_bytes,
    make_tar,
    write_layout,
)

AMD64 = OciPlatform("linux", "amd64")
BUDGET = Config.layer_budget  # the default configuration's
S390X = OciPlatform("linux", "s390x")
LIBC_BANNER = b"\x00GNU C Library (Debian GLIBC 2.36-9+deb12u7) stable release version 2.36.\n\x00"


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "store")


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """A two-layer glibc-looking image behind a two-platform index, tagged v1."""
    first = make_tar({"lib/x86_64-linux-gnu/libc.so.6": LIBC_BANNER, "bin/sh": b"#!"})
    second = make_tar({"etc/motd": b"hello\n"})
    return write_layout(tmp_path / "layout", [first, second], tag="v1", nested_index=True)


def stored_blobs(store: FilesystemStore) -> list[str]:
    return sorted(p.name for p in (store.root / "blobs" / "sha256").iterdir())


async def assert_layers_stored(store: FilesystemStore, layout: Layout) -> None:
    for digest in (*layout.layer_digests, layout.config_digest):
        data = await store.get_blob_bytes(digest)
        assert sha256_digest(data) == digest


# --- from a registry --------------------------------------------------------------------


async def test_resolve_by_tag(upstream_registry: Registry, layout: Layout, store, session) -> None:
    upstream_registry.push(layout.path, "base/img:v1", "v1")
    image = await resolve_base_image(f"{upstream_registry.host}/base/img:v1", AMD64, store, session, layer_budget=BUDGET)
    assert [layer.digest for layer in image.layers] == list(layout.layer_digests)
    assert image.diff_ids == layout.diff_ids
    assert image.config is not None and image.config["rootfs"]["diff_ids"] == list(layout.diff_ids)
    assert image.glibc_version == "2.36"
    await assert_layers_stored(store, layout)
    assert len(await store.list_records(RECORD_KIND)) == 1


async def test_resolve_index_by_digest_picks_platform(
    upstream_registry: Registry, layout: Layout, store, session
) -> None:
    upstream_registry.push(layout.path, "base/multi:v1", "v1", all_platforms=True)
    assert layout.index_digest is not None
    spec = f"{upstream_registry.host}/base/multi:v1@{layout.index_digest}"
    amd64 = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    s390x = await resolve_base_image(spec, S390X, store, session, layer_budget=BUDGET)
    assert amd64.config["architecture"] == "amd64" and s390x.config["architecture"] == "s390x"
    assert amd64.layers == s390x.layers
    # digest alone, no tag, works too
    by_digest = await resolve_base_image(f"{upstream_registry.host}/base/multi@{layout.index_digest}", AMD64, store, session, layer_budget=BUDGET)
    assert by_digest == amd64
    with pytest.raises(BaseImageError, match="no manifest for linux/ppc64le"):
        await resolve_base_image(spec, OciPlatform("linux", "ppc64le"), store, session, layer_budget=BUDGET)


async def test_wrong_digest_pin_is_refused(upstream_registry: Registry, layout: Layout, store, session) -> None:
    upstream_registry.push(layout.path, "base/img:v1", "v1")
    pin = sha256_digest(b"some other image")
    with pytest.raises(BaseImageError, match="404"):
        await resolve_base_image(f"{upstream_registry.host}/base/img:v1@{pin}", AMD64, store, session, layer_budget=BUDGET)
    assert stored_blobs(store) == [] and await store.list_records(RECORD_KIND) == []


async def test_token_auth_flow(token_registry: Registry, layout: Layout, store, session) -> None:
    token_registry.push(layout.path, "base/img:v1", "v1")
    assert token_registry.token_server is not None
    pushes = len(token_registry.token_server.requests)
    image = await resolve_base_image(f"{token_registry.host}/base/img:v1", AMD64, store, session, layer_budget=BUDGET)
    assert image.glibc_version == "2.36"
    ours = token_registry.token_server.requests[pushes:]
    # one token for the whole pull: reused for the manifest, config and layers
    assert ours == [{"scope": ["repository:base/img:pull"], "service": ["condery-test-registry"]}]
    await assert_layers_stored(store, layout)


async def test_without_token_the_registry_refuses(token_registry: Registry, session) -> None:
    """The token registry really enforces auth, so the flow above is really exercised."""
    async with session.get(f"http://{token_registry.host}/v2/base/img/manifests/v1") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer realm=")


async def test_second_resolve_hits_the_cache(upstream_registry: Registry, layout: Layout, store, session) -> None:
    upstream_registry.push(layout.path, "base/img:v1", "v1")
    spec = f"{upstream_registry.host}/base/img:v1"
    first = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    upstream_registry.stop()
    assert await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET) == first
    # a spec that was never resolved does need the (now stopped) registry
    with pytest.raises(BaseImageError):
        await resolve_base_image(f"{upstream_registry.host}/base/img:v2", AMD64, store, session, layer_budget=BUDGET)


async def test_corrupted_blob_is_refused(
    upstream_registry: Registry, layout: Layout, tmp_path: Path, store, session
) -> None:
    upstream_registry.push(layout.path, "base/img:v1", "v1")
    # Distribution serves what is on its disk: flip the layer's bytes there (same length).
    hexdigest = layout.layer_digests[0].removeprefix("sha256:")
    data_dir = upstream_registry.log_path.parent / "data"
    blob = data_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))
    with pytest.raises(BaseImageError, match="does not match its digest"):
        await resolve_base_image(f"{upstream_registry.host}/base/img:v1", AMD64, store, session, layer_budget=BUDGET)
    assert stored_blobs(store) == [] and await store.list_records(RECORD_KIND) == []


# --- from a hostile server ----------------------------------------------------------------


async def hostile_server(aiohttp_server, routes: dict[str, tuple[bytes, dict[str, str]]]):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> web.StreamResponse:
        body, headers = routes.get(request.path, (b"", {}))
        if not body:
            return web.Response(status=404)
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return await aiohttp_server(app)


async def test_manifest_not_matching_its_pin_is_refused(aiohttp_server, store, session) -> None:
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}).encode()
    pin = sha256_digest(b"what we pinned")
    server = await hostile_server(aiohttp_server, {
        f"/v2/evil/img/manifests/{pin}": (manifest, {"Content-Type": OCI_MANIFEST}),
    })
    with pytest.raises(BaseImageError, match="has digest"):
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img@{pin}", AMD64, store, session, layer_budget=BUDGET)
    assert stored_blobs(store) == []


async def test_oversized_manifest_is_refused(aiohttp_server, store, session) -> None:
    server = await hostile_server(aiohttp_server, {
        "/v2/evil/img/manifests/latest": (b"{" + b" " * (5 << 20) + b"}", {"Content-Type": OCI_MANIFEST}),
    })
    with pytest.raises(BaseImageError, match="over the .* byte limit"):
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=BUDGET)


async def test_layer_not_matching_diff_id_is_refused(aiohttp_server, store, session) -> None:
    """The blob matches its digest, but unpacks to something other than the config says."""
    tar = make_tar({"etc/motd": b"hi"})
    layer = gzip_bytes(tar)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"other tar")]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(layer), "size": len(layer)}],
    }).encode()
    server = await hostile_server(aiohttp_server, {
        "/v2/evil/img/manifests/latest": (manifest, {"Content-Type": OCI_MANIFEST}),
        f"/v2/evil/img/blobs/{sha256_digest(config)}": (config, {}),
        f"/v2/evil/img/blobs/{sha256_digest(layer)}": (layer, {}),
    })
    with pytest.raises(BaseImageError, match="unpacks to"):
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img:latest", AMD64, store, session, layer_budget=BUDGET)
    assert stored_blobs(store) == []


# --- from a local layout, and scratch ------------------------------------------------------


async def test_oci_layout(layout: Layout, store, session) -> None:
    image = await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=BUDGET)
    assert [layer.digest for layer in image.layers] == list(layout.layer_digests)
    assert image.glibc_version == "2.36"
    await assert_layers_stored(store, layout)
    # the only entry is the default tag; the nested index is followed to our platform
    assert await resolve_base_image(f"oci:{layout.path}", AMD64, store, session, layer_budget=BUDGET) == image
    s390x = await resolve_base_image(f"oci:{layout.path}:v1", S390X, store, session, layer_budget=BUDGET)
    assert s390x.config["architecture"] == "s390x"
    with pytest.raises(BaseImageError, match="no single image tagged v2"):
        await resolve_base_image(f"oci:{layout.path}:v2", AMD64, store, session, layer_budget=BUDGET)
    with pytest.raises(BaseImageError, match="not an OCI image layout"):
        await resolve_base_image(f"oci:{layout.path}/nowhere", AMD64, store, session, layer_budget=BUDGET)


async def test_oci_layout_with_corrupted_blob(layout: Layout, store, session) -> None:
    blob = layout.path / "blobs/sha256" / layout.layer_digests[1].removeprefix("sha256:")
    content = bytearray(blob.read_bytes())
    content[-1] ^= 0xFF  # gzip's trailing length byte: still the same size
    blob.write_bytes(bytes(content))
    with pytest.raises(BaseImageError, match="does not match its digest"):
        await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=BUDGET)
    assert stored_blobs(store) == [] and await store.list_records(RECORD_KIND) == []


async def test_real_debian_glibc_base(store, session, tmp_path: Path) -> None:
    source = glibc_base_layout()
    copy = tmp_path / "debian"
    shutil.copytree(source, copy)
    image = await resolve_base_image(f"oci:{copy}:bookworm", AMD64, store, session, layer_budget=BUDGET)
    assert image.glibc_version == "2.36"
    assert len(image.layers) == 1 and image.config["config"]["Cmd"] == ["/bin/sh"]


async def test_scratch(store, session) -> None:
    image = await resolve_base_image("scratch", AMD64, store, session, layer_budget=BUDGET)
    assert image == SCRATCH and image.config is None and image.layers == () and image.glibc_version is None


async def test_platform_mismatch_of_a_single_manifest(upstream_registry: Registry, layout: Layout, store, session) -> None:
    upstream_registry.push(layout.path, "base/img:v1", "v1")  # pushes only the amd64 manifest
    with pytest.raises(BaseImageError, match="not linux/s390x"):
        await resolve_base_image(f"{upstream_registry.host}/base/img:v1", S390X, store, session, layer_budget=BUDGET)


# --- pieces ---------------------------------------------------------------------------


def test_scan_finds_glibc_from_dpkg_status_and_old_symlinks(tmp_path: Path) -> None:
    status = (b"Package: libc6\nStatus: install ok installed\nVersion: 2.36-9+deb12u7\n\n"
              b"Package: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13.dfsg-1\n")
    cases = {
        "dpkg": (make_tar({"var/lib/dpkg/status": status}), "2.36"),
        "distroless": (make_tar({"var/lib/dpkg/status.d/libc6": status}), "2.36"),
        "symlink": (make_tar({"lib/x86_64-linux-gnu/libc.so.6": "libc-2.31.so",
                              "lib/x86_64-linux-gnu/libc-2.31.so": b"\x7fELF"}), "2.31"),
        "ld": (make_tar({"./lib64/ld-linux-x86-64.so.2": "/lib/x86_64-linux-gnu/ld-2.28.so"}), "2.28"),
        "musl": (make_tar({"lib/ld-musl-x86_64.so.1": b"\x7fELF", "lib/libc.musl-x86_64.so.1": "ld-musl-x86_64.so.1"}), None),
    }
    for name, (tar, expected) in cases.items():
        for suffix, data in (("tar", tar), ("gz", gzip_bytes(tar))):
            path = tmp_path / f"{name}.{suffix}"
            path.write_bytes(data)
            scan = scan_layer(path)
            assert scan.glibc_version == expected, name
            assert scan.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_scan_reads_zstd_layers(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    tar = make_tar({"usr/lib/x86_64-linux-gnu/libc.so.6": LIBC_BANNER})
    path = tmp_path / "layer.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(tar))
    assert scan_layer(path).glibc_version == "2.36"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("debian:bookworm-slim", ("registry-1.docker.io", "library/debian", "bookworm-slim", None)),
        ("docker.io/library/debian:bookworm-slim@sha256:" + "a" * 64,
         ("registry-1.docker.io", "library/debian", "bookworm-slim", "sha256:" + "a" * 64)),
        ("quay.io/org/img", ("quay.io", "org/img", "latest", None)),
        ("localhost:5000/a/b:1.0", ("localhost:5000", "a/b", "1.0", None)),
        ("127.0.0.1:5000/base@sha256:" + "b" * 64, ("127.0.0.1:5000", "base", None, "sha256:" + "b" * 64)),
        ("[::1]:5000/x:y", ("[::1]:5000", "x", "y", None)),
    ],
)
def test_reference_parsing(text: str, expected: tuple) -> None:  # type: ignore[type-arg]
    ref = ImageReference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == expected


@pytest.mark.parametrize(
    "text",
    ["Debian:latest", "a/../b", "host:5000/a/b:bad tag", "img@sha256:short", "a//b", "img:" + "t" * 129, "evil host/x"],
)
def test_reference_parsing_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        ImageReference.parse(text)


def test_schemes_and_challenges() -> None:
    assert base_url("127.0.0.2:5000") == "http://127.0.0.2:5000"
    assert base_url("localhost") == "http://localhost"
    assert base_url("[::1]:80") == "http://[::1]:80"
    assert base_url("registry-1.docker.io") == "https://registry-1.docker.io"
    assert not is_loopback_host("127.example.org")
    assert parse_bearer_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull"'
    ) == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io", "scope": "repository:library/debian:pull"}
    with pytest.raises(UpstreamError, match="Basic"):
        parse_bearer_challenge('Basic realm="x"')
    with pytest.raises(UpstreamError, match="realm"):
        parse_bearer_challenge('Bearer service="x"')


# --- hostile bases: repeated layers, budgets, sizes, broken layouts ------------------------


def repeat_layers(path: Path, tag: str, times: int) -> str:
    """Rewrite the layout's image `tag` so that its manifest lists every layer `times`
    times (config diff_ids and history to match); returns the new manifest digest.

    The blobs are shared, so the layout grows by two small JSON files only.
    """
    blobs = path / "blobs" / "sha256"
    index = json.loads((path / "index.json").read_text())
    entry = next(e for e in index["manifests"] if e["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"] * times
    config["history"] = config.get("history", []) * times

    def put(document: dict) -> tuple[str, int]:
        data = json.dumps(document).encode()
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest, len(data)

    manifest["config"]["digest"], manifest["config"]["size"] = put(config)
    manifest["layers"] = manifest["layers"] * times
    entry["digest"], entry["size"] = put(manifest)
    (path / "index.json").unlink()  # as above: never write through a hard link
    (path / "index.json").write_text(json.dumps(index))
    return entry["digest"]


def break_manifest(path: Path, tag: str) -> None:
    """Change the bytes of the manifest index.json names for `tag`, keeping its name
    (and its size: a space swapped for a newline is still valid JSON)."""
    index = json.loads((path / "index.json").read_text())
    entry = next(e for e in index["manifests"] if e["annotations"]["org.opencontainers.image.ref.name"] == tag)
    blob = path / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")
    data = blob.read_bytes()
    blob.unlink()  # a new file: the layout may share its blobs with another by hard links
    blob.write_bytes(data[:-1] + b"\n" if data.endswith(b"}") else data + b" ")


class WorkDirWatch:
    """Polls the base import's work directories and keeps the most files seen at once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            count = sum(len(files) for _, _, files in os.walk(self.root))
            self.most = max(self.most, count)
            time.sleep(0.0005)

    def __enter__(self) -> "WorkDirWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where base imports stage layers (tempfile's directory, as TMPDIR would set it)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    return work


async def test_layer_listed_5000_times_is_staged_and_stored_once(tmp_path: Path, store, session, work_dir) -> None:
    big = make_tar({"lib/x86_64-linux-gnu/libc.so.6": LIBC_BANNER, "data": os.urandom(512 << 10)})
    layout = write_layout(tmp_path / "layout", [big], tag="v1")
    repeat_layers(layout.path, "v1", 5000)
    started = time.monotonic()
    with WorkDirWatch(work_dir) as watch:
        image = await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=5002)
    elapsed = time.monotonic() - started
    # 5,000 copies would be 2.5 GB through the work directory and as many scans.
    assert elapsed < 10, elapsed
    assert watch.most <= 1 and not list(work_dir.iterdir())
    assert [layer.digest for layer in image.layers] == list(layout.layer_digests) * 5000
    assert image.diff_ids == layout.diff_ids * 5000 and image.glibc_version == "2.36"
    config_digest = sha256_digest(json.dumps(image.config).encode())
    assert stored_blobs(store) == sorted([layout.layer_digests[0][7:], config_digest[7:]])
    # the record answers the next resolve, repeats and all
    assert await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=5002) == image


async def counting_server(aiohttp_server, routes: dict[str, bytes]):  # type: ignore[no-untyped-def]
    """A registry that serves fixed bytes (manifests with their media type) and counts GETs."""
    hits: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        hits[request.path] = hits.get(request.path, 0) + 1
        body = routes.get(request.path)
        if body is None:
            return web.Response(status=404)
        media = OCI_MANIFEST if "/manifests/" in request.path else "application/octet-stream"
        return web.Response(body=body, headers={"Content-Type": media})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    return server, hits


def served_image(layers: list[bytes], times: int = 1, sizes: list[int] | None = None) -> dict[str, bytes]:
    """Routes of image `evil/img:latest` whose manifest lists `layers` (gzip blobs) `times` times."""
    diff_ids = [sha256_digest(gzip.decompress(blob)) for blob in layers] * times
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    descriptors = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(blob),
         "size": len(blob) if sizes is None else sizes[i]}
        for i, blob in enumerate(layers)
    ] * times
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config), "size": len(config)},
        "layers": descriptors,
    }).encode()
    routes = {"/v2/evil/img/manifests/latest": manifest, f"/v2/evil/img/blobs/{sha256_digest(config)}": config}
    routes.update({f"/v2/evil/img/blobs/{sha256_digest(blob)}": blob for blob in layers})
    return routes


async def test_repeated_layer_is_downloaded_once(aiohttp_server, store, session) -> None:
    layer = gzip_bytes(make_tar({"etc/motd": b"hi\n"}))
    server, hits = await counting_server(aiohttp_server, served_image([layer], times=300))
    image = await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=302)
    assert len(image.layers) == 300
    assert hits[f"/v2/evil/img/blobs/{sha256_digest(layer)}"] == 1


async def test_too_many_layers_refused_before_any_download(aiohttp_server, store, session) -> None:
    layer = gzip_bytes(make_tar({"etc/motd": b"hi\n"}))
    server, hits = await counting_server(aiohttp_server, served_image([layer], times=5000))
    with pytest.raises(BaseImageError, match=r": 5000 layers; with layer_budget 100 a base may have at most 98"):
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=BUDGET)
    assert list(hits) == ["/v2/evil/img/manifests/latest"]  # neither config nor layer fetched
    assert stored_blobs(store) == []


async def test_layer_budget_boundary(layout: Layout, store, session) -> None:
    """Two base layers fit a budget of 4 (2 + a package layer + the environment layer), not 3."""
    spec = f"oci:{layout.path}:v1"
    with pytest.raises(BaseImageError, match=": 2 layers; with layer_budget 3 a base may have at most 1"):
        await resolve_base_image(spec, AMD64, store, session, layer_budget=3)
    assert stored_blobs(store) == []
    image = await resolve_base_image(spec, AMD64, store, session, layer_budget=4)
    assert len(image.layers) == 2
    # A base recorded under a larger budget is refused once the budget shrinks.
    with pytest.raises(BaseImageError, match=": 2 layers; with layer_budget 3"):
        await resolve_base_image(spec, AMD64, store, session, layer_budget=3)


async def test_declared_size_over_the_bound_refused_before_download(aiohttp_server, store, session) -> None:
    first, second = (gzip_bytes(make_tar({name: b"x"})) for name in ("a", "b"))
    half = MAX_BASE_SIZE // 2 + 1  # each under the bound, together over it
    server, hits = await counting_server(aiohttp_server, served_image([first, second], sizes=[half, half]))
    with pytest.raises(BaseImageError, match="over the .* byte limit"):
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=BUDGET)
    assert list(hits) == ["/v2/evil/img/manifests/latest"]


async def test_repeats_count_once_towards_the_size_bound(aiohttp_server, store, session) -> None:
    layer = gzip_bytes(make_tar({"etc/motd": b"hi\n"}))
    routes = served_image([layer], times=50)
    server, _ = await counting_server(aiohttp_server, routes)
    image = await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=52)
    assert len(image.layers) == 50


async def test_oci_layout_manifest_not_matching_its_digest(layout: Layout, store, session) -> None:
    break_manifest(layout.path, "v1")
    with pytest.raises(BaseImageError) as caught:
        await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=BUDGET)
    message = str(caught.value)
    assert message.startswith("the base image's OCI layout: ") and "does not match its digest" in message
    assert str(layout.path) not in message and "/tmp" not in message
    assert stored_blobs(store) == [] and await store.list_records(RECORD_KIND) == []


def _not_a_layout(layout: Layout) -> str:
    (layout.path / "oci-layout").unlink()
    return "not an OCI image layout"


def _malformed_index(layout: Layout) -> str:
    (layout.path / "index.json").write_text('{"manifests": [{"digest": 5}]}')
    return "malformed index.json"


def _missing_blob(layout: Layout) -> str:
    (layout.path / "blobs/sha256" / layout.layer_digests[0].removeprefix("sha256:")).unlink()
    return "No such file or directory"


def _fifo_blob(layout: Layout) -> str:
    blob = layout.path / "blobs/sha256" / layout.layer_digests[0].removeprefix("sha256:")
    blob.unlink()
    os.mkfifo(blob)  # opening it for reading would wait for a writer for ever
    return "not a regular file"


def _device_blob(layout: Layout) -> str:
    blob = layout.path / "blobs/sha256" / layout.config_digest.removeprefix("sha256:")
    blob.unlink()
    blob.symlink_to("/dev/zero")
    return "not a regular file"


def _unknown_tag(layout: Layout) -> str:
    index = json.loads((layout.path / "index.json").read_text())
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "other"
    (layout.path / "index.json").write_text(json.dumps(index))
    return "no single image tagged v1"


def _corrupted_layer(layout: Layout) -> str:
    blob = layout.path / "blobs/sha256" / layout.layer_digests[1].removeprefix("sha256:")
    data = blob.read_bytes()
    blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    return "does not match its digest"


@pytest.mark.parametrize(
    "damage", [_not_a_layout, _malformed_index, _missing_blob, _fifo_blob, _device_blob, _unknown_tag, _corrupted_layer]
)
@pytest.mark.timeout(30)
async def test_broken_layouts_name_no_path(damage, layout: Layout, store, session) -> None:
    expected = damage(layout)
    with pytest.raises(BaseImageError) as caught:
        await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=BUDGET)
    message = str(caught.value)
    assert expected in message, message
    assert str(layout.path) not in message and str(layout.path.parent) not in message and "oci:" not in message
    assert stored_blobs(store) == []


@pytest.mark.parametrize(
    "spec",
    ["user:s3cret@registry.example.org/base/img:v1", "https://user:s3cret@registry.example.org/img",
     "registry.example.org/img@s3cret", "u:p@ss:s3cret@registry.example.org/img"],
)
async def test_malformed_reference_with_credentials_is_not_echoed(spec: str, store, session) -> None:
    with pytest.raises(BaseImageError) as caught:
        await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    assert "s3cret" not in str(caught.value) and "credentials are not supported" in str(caught.value)


async def test_token_realm_credentials_are_not_echoed(aiohttp_server, store, session) -> None:
    async def challenge(request: web.Request) -> web.Response:
        realm = "http://robot:s3cret@auth.example.org/token?secret=s3cret"
        return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="x"'})

    app = web.Application()
    app.router.add_get("/{tail:.*}", challenge)
    server = await aiohttp_server(app)
    with pytest.raises(BaseImageError, match="refusing token realm http://auth.example.org: not https") as caught:
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=BUDGET)
    assert "s3cret" not in str(caught.value)


async def test_huge_error_text_is_cut_short(aiohttp_server, store, session) -> None:
    """A manifest can put megabytes into a field we quote; the client gets a short message."""
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "x" * (1 << 20), "digest": "sha256:" + "a" * 64, "size": 1},
                           "layers": []}).encode()
    server, _ = await counting_server(aiohttp_server, {"/v2/evil/img/manifests/latest": manifest})
    with pytest.raises(BaseImageError, match=r"config media type 'x+\.\.\. is not an image config") as caught:
        await resolve_base_image(f"127.0.0.1:{server.port}/evil/img", AMD64, store, session, layer_budget=BUDGET)
    assert len(str(caught.value)) < 200


# --- hostile configs and layer streams -------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"config": ["not", "an", "object"]}, "'config' is not an object"),
        ({"config": {"Env": "PATH=/bin"}}, "Env is not a list of strings"),
        ({"config": {"Env": [1]}}, "Env is not a list of strings"),
        ({"config": {"Labels": ["a", "b"]}}, "Labels do not map"),
        ({"config": {"Labels": {"a": 1}}}, "Labels do not map"),
        ({"config": {"Cmd": "sh"}}, "Cmd is not a list of strings"),
        ({"config": {"User": 0}}, "User is not a string"),
        ({"history": {"created_by": "x"}}, "history is not a list"),
    ],
)
def test_badly_typed_base_config_is_refused(settings: dict, match: str) -> None:
    layer = Descriptor(OCI_LAYER_GZIP, sha256_digest(b"layer"), 5)
    config = {"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"t")]},
              **settings}
    with pytest.raises(ManifestError, match=match):
        checked_config(config, (layer,), AMD64)


def test_one_digest_with_two_diff_ids_or_sizes_is_refused() -> None:
    layer = Descriptor(OCI_LAYER_GZIP, sha256_digest(b"layer"), 5)
    config = {"os": "linux", "architecture": "amd64",
              "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b"a"), sha256_digest(b"b")]}}
    with pytest.raises(ManifestError, match="two different diff_ids"):
        checked_config(config, (layer, layer), AMD64)
    with pytest.raises(ManifestError, match="listed with sizes 5 and 6"):
        distinct_layers((layer, Descriptor(OCI_LAYER_GZIP, layer.digest, 6)))


def _pax_bomb() -> bytes:
    """A tar whose first header announces a 1 GiB pax extended header (zeros: tiny gzipped)."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 1 << 30
    return header.tobuf(format=tarfile.USTAR_FORMAT) + b"\0" * (4 << 20)


def _deflate_garbage() -> bytes:
    data = bytearray(gzip_bytes(make_tar({"etc/motd": os.urandom(4096)})))
    data[40:60] = b"\xff" * 20  # inside the deflate stream: zlib.error, not an OSError
    return bytes(data)


@pytest.mark.parametrize(
    "layer",
    [
        pytest.param(lambda: gzip_bytes(_pax_bomb()), id="1 GiB pax header"),
        pytest.param(_deflate_garbage, id="bad deflate data"),
        pytest.param(lambda: b"\x28\xb5\x2f\xfd" + os.urandom(64), id="bad zstd frame"),
        pytest.param(lambda: b"\x1f\x8b" + os.urandom(64), id="bad gzip header"),
        pytest.param(lambda: make_tar({"a": b"x"})[:700], id="truncated tar"),
    ],
)
def test_hostile_layer_streams_are_manifest_errors(layer, tmp_path: Path) -> None:
    path = tmp_path / "layer"
    path.write_bytes(layer())
    with pytest.raises(ManifestError):
        scan_layer(path)


def test_unpacked_size_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "layer"
    path.write_bytes(gzip_bytes(make_tar({"zeros": b"\0" * (1 << 20)})))
    assert scan_layer(path).size > 1 << 20
    with pytest.raises(ManifestError, match="unpacks to more than"):
        scan_layer(path, limit=1 << 20)


# --- fuzzing the parsers with hypothesis -----------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.sampled_from(["sha256:" + "a" * 64, OCI_MANIFEST, OCI_LAYER_GZIP, "application/vnd.oci.image.config.v1+json",
                       "linux", "amd64"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["mediaType", "digest", "size", "config", "layers", "manifests", "platform", "os",
                         "architecture", "variant", "rootfs", "diff_ids", "annotations", "Env", "Labels", "history"])
        | st.text(max_size=5),
        children, max_size=6),
    max_leaves=15,
)


@settings(max_examples=150, deadline=None)
@given(doc=st.dictionaries(st.sampled_from(["config", "layers", "manifests", "rootfs", "os", "architecture"]), _json))
def test_parsers_raise_only_manifest_errors(doc: dict) -> None:
    for parse in (
        lambda: parse_image_manifest(doc, BUDGET),
        lambda: checked_config(doc, (Descriptor(OCI_LAYER_GZIP, "sha256:" + "a" * 64, 1),), AMD64),
        lambda: select_platform(references(json.dumps(doc).encode()).manifests, AMD64),
    ):
        try:
            parse()
        except (ManifestError, BaseImageError):
            pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=_json | st.binary(max_size=64))
def test_layout_index_fuzz(index, tmp_path: Path) -> None:
    path = tmp_path / "fuzzed"
    path.mkdir(exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    try:
        OciLayout.from_spec(str(path)).root_manifest()
    except (ManifestError, LayoutError) as exc:
        assert str(tmp_path) not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), magic=st.sampled_from([b"", b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd"]))
def test_scan_layer_fuzz(data: bytes, magic: bytes, tmp_path: Path) -> None:
    path = tmp_path / "fuzzed-layer"
    path.write_bytes(magic + data)
    try:
        scan_layer(path)
    except ManifestError:
        pass


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"Content-Type: " + OCI_MANIFEST.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"schemaVe",
                     id="body cut short"),
        pytest.param(b"X-Padding: " + b"a" * (1 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}", id="1 MB header"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad chunked encoding"),
    ],
)
async def test_upstream_speaking_broken_http(reply: bytes, store, session) -> None:
    """A registry whose answer to the manifest GET is not well-formed HTTP."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(BaseImageError, match="base image 127.0.0.1"):
            await resolve_base_image(f"127.0.0.1:{port}/evil/img", AMD64, store, session, layer_budget=BUDGET)


# --- zstd and uncompressed layers are served as gzip ---------------------------------------


def recompress_layers(path: Path, tag: str, compressions: list[str]) -> str:
    """Rewrite the layout's image `tag` (a manifest, not an index) so that layer i is
    stored as `compressions[i]`: "tar" (uncompressed), "zstd" or "gzip" (as it was).
    The config is unchanged: its diff_ids are those of the uncompressed tars. Returns
    the new manifest digest; new files only, never written through a hard link."""
    import zstandard

    blobs = path / "blobs" / "sha256"
    index = json.loads((path / "index.json").read_text())
    entry = next(e for e in index["manifests"] if e["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_bytes())
    types = {"tar": OCI_LAYER_TAR, "zstd": OCI_LAYER_ZSTD, "gzip": OCI_LAYER_GZIP}

    def put(data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        target = blobs / digest.removeprefix("sha256:")
        if not target.exists():
            target.write_bytes(data)
        return digest, len(data)

    for layer, compression in zip(manifest["layers"], compressions, strict=True):
        tar = gzip.decompress((blobs / layer["digest"].removeprefix("sha256:")).read_bytes())
        data = {"tar": tar, "zstd": zstandard.ZstdCompressor().compress(tar), "gzip": gzip_bytes(tar)}[compression]
        layer["mediaType"] = types[compression]
        layer["digest"], layer["size"] = put(data)
    entry["digest"], entry["size"] = put(json.dumps(manifest).encode())
    (path / "index.json").unlink()
    (path / "index.json").write_text(json.dumps(index))
    return entry["digest"]


@pytest.fixture
def mixed_layout(tmp_path: Path) -> Layout:
    """Three layers, stored uncompressed, as zstd and as gzip, in that order."""
    tars = [make_tar({"lib/x86_64-linux-gnu/libc.so.6": LIBC_BANNER}), make_tar({"etc/motd": b"hi\n" * 1000}),
            make_tar({"etc/hostname": b"base\n"})]
    layout = write_layout(tmp_path / "mixed", tars, tag="v1")
    recompress_layers(layout.path, "v1", ["tar", "zstd", "gzip"])
    return layout


async def test_zstd_and_uncompressed_layers_become_deterministic_gzip(
    mixed_layout: Layout, store, session, tmp_path: Path
) -> None:
    spec = f"oci:{mixed_layout.path}:v1"
    image = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    assert [layer.media_type for layer in image.layers] == [OCI_LAYER_GZIP] * 3
    assert image.diff_ids == mixed_layout.diff_ids and image.glibc_version == "2.36"
    # the gzip layer is served as it was; the other two are new gzip streams
    assert image.layers[2].digest == mixed_layout.layer_digests[2]
    for layer, diff_id in zip(image.layers, image.diff_ids, strict=True):
        blob = await store.get_blob_bytes(layer.digest)
        assert blob[:2] == b"\x1f\x8b" and len(blob) == layer.size
        assert sha256_digest(gzip.decompress(blob)) == diff_id
        assert blob[4:8] == b"\x00\x00\x00\x00" and not blob[3] & 0x08  # mtime 0, no file name
    assert len(await store.list_records(GZIP_RECORD_KIND)) == 2
    # Both manifest families can describe the image now (the Docker one could not).
    config = Descriptor(OCI_CONFIG, sha256_digest(b"{}"), 2)
    assert json.loads(docker_manifest(config, image.layers))["layers"][0]["mediaType"] == DOCKER_LAYER_GZIP
    # Another replica, with its own store, computes the same digests.
    other = FilesystemStore(tmp_path / "other-store")
    assert await resolve_base_image(spec, AMD64, other, session, layer_budget=BUDGET) == image


async def test_recompression_is_recorded_and_reused(mixed_layout: Layout, store, session, tmp_path: Path) -> None:
    spec = f"oci:{mixed_layout.path}:v1"
    image = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    key = image.layers[1].digest
    # Drop the image record: the next import finds the gzip records and writes no blob.
    for record in await store.list_records(RECORD_KIND):
        (store.root / "records" / RECORD_KIND / f"{record}.json").unlink()
    blob = store.root / "blobs" / "sha256" / key.removeprefix("sha256:")
    before = blob.stat().st_mtime_ns
    assert await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET) == image
    assert blob.stat().st_mtime_ns == before
    # A lost gzip blob is recompressed to the same digest.
    for record in await store.list_records(RECORD_KIND):
        (store.root / "records" / RECORD_KIND / f"{record}.json").unlink()
    blob.unlink()
    assert await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET) == image
    assert blob.exists()


async def test_record_of_a_zstd_layer_is_imported_again(mixed_layout: Layout, store, session) -> None:
    """A base-images record written before recompression existed names zstd/tar layers."""
    spec = f"oci:{mixed_layout.path}:v1"
    image = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    [key] = await store.list_records(RECORD_KIND)
    record = await store.get_record(RECORD_KIND, key)
    record["layers"][1] = {"mediaType": OCI_LAYER_ZSTD, "digest": image.layers[2].digest, "size": image.layers[2].size}
    await store.put_record(RECORD_KIND, key, record)
    assert await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET) == image


async def test_zstd_layer_not_matching_its_diff_id_is_refused(tmp_path: Path, store, session) -> None:
    layout = write_layout(tmp_path / "bad", [make_tar({"etc/motd": b"one\n"})], tag="v1")
    zstandard = pytest.importorskip("zstandard")
    recompress_layers(layout.path, "v1", ["zstd"])
    # swap the zstd blob's content for another tar of the same media type
    blobs = layout.path / "blobs" / "sha256"
    index = json.loads((layout.path / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    other = zstandard.ZstdCompressor().compress(make_tar({"etc/motd": b"two\n"}))
    manifest["layers"][0].update(digest=sha256_digest(other), size=len(other))
    (blobs / sha256_digest(other)[7:]).write_bytes(other)
    data = json.dumps(manifest).encode()
    (blobs / sha256_digest(data)[7:]).write_bytes(data)
    index["manifests"][0].update(digest=sha256_digest(data), size=len(data))
    (layout.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(BaseImageError, match="the config says"):
        await resolve_base_image(f"oci:{layout.path}:v1", AMD64, store, session, layer_budget=BUDGET)
    assert stored_blobs(store) == [] and await store.list_records(GZIP_RECORD_KIND) == []


def test_gzip_layer_reads_every_compression(tmp_path: Path) -> None:
    import zstandard

    tar = make_tar({"etc/motd": b"hello\n"})
    digests = set()
    for name, data in (("tar", tar), ("zst", zstandard.ZstdCompressor().compress(tar)), ("gz", gzip_bytes(tar))):
        (tmp_path / name).write_bytes(data)
        blob = gzip_layer(tmp_path / name, tmp_path / f"{name}.out")
        assert blob.diff_id == sha256_digest(tar) and blob.size == (tmp_path / f"{name}.out").stat().st_size
        digests.add(blob.digest)
    assert len(digests) == 1  # one deterministic stream whatever the source compression
    (tmp_path / "bad").write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(64))
    with pytest.raises(ManifestError):
        gzip_layer(tmp_path / "bad", tmp_path / "bad.out")


def test_scan_reads_the_accounts_and_their_whiteouts(tmp_path: Path) -> None:
    passwd, group = b"root:x:0:0:root:/root:/bin/sh\n", b"root:x:0:\n"
    cases = {
        "both": (make_tar({"etc/passwd": passwd, "./etc/group": group}), {"passwd": passwd.decode(), "group": group.decode()}),
        "none": (make_tar({"etc/hostname": b"x\n"}), {}),
        "whiteout": (make_tar({"etc/.wh.passwd": b""}), {"passwd": None}),
        # An opaque etc hides the layers below, not this layer's own passwd.
        "opaque": (make_tar({"etc/.wh..wh..opq": b"", "etc/passwd": passwd}), {"passwd": passwd.decode(), "group": None}),
        # A passwd this layer replaces but we will not read: absent, never the lower layer's.
        "oversized": (make_tar({"etc/passwd": b"x" * (2 << 20)}), {"passwd": None}),
    }
    for name, (tar, expected) in cases.items():
        path = tmp_path / f"{name}.tar.gz"
        path.write_bytes(gzip_bytes(tar))
        assert dict(scan_layer(path).accounts) == expected, name


async def test_base_accounts_survive_the_record(tmp_path: Path, store, session) -> None:
    """The glibc test base's passwd reaches BaseImage, from the import and from its record."""
    spec = f"oci:{glibc_base_layout()}:bookworm"
    first = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    again = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    for image in (first, again):
        assert image.passwd is not None and "user:x:1000:1000:" in image.passwd
        assert image.group is not None and image.group.startswith("root:x:0:")


async def test_a_record_from_before_accounts_reads_them_from_the_stored_layers(tmp_path: Path, store, session,
                                                                              monkeypatch) -> None:
    """An upgraded registry's base records have no accounts: they are read from the
    stored layers, not by importing again (an offline site's registry may be out of
    reach, so the import is made to fail here)."""
    spec = f"oci:{glibc_base_layout()}:bookworm"
    first = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    keys = await store.list_records(RECORD_KIND)
    assert keys
    for key in keys:
        record = await store.get_record(RECORD_KIND, key)
        if "accounts" in record:
            del record["accounts"]
            await store.put_record(RECORD_KIND, key, record)

    async def no_import(*args, **kwargs):  # the upstream is gone
        raise AssertionError("imported again")

    monkeypatch.setattr("condery.bases.resolve.import_image", no_import)
    again = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    assert (again.passwd, again.group) == (first.passwd, first.group) and again.passwd is not None
    records = [await store.get_record(RECORD_KIND, key) for key in keys]
    assert all("accounts" in record for record in records)  # written back: read once
