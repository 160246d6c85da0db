"""Base images: from a real registry (with and without token auth), a local layout, scratch.

Upstreams are real CNCF Distribution processes (tests/fixtures/upstream.py); the hostile
cases that Distribution would never produce (a manifest that does not match its pin, an
oversized manifest) come from a small aiohttp server that lies on purpose.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from condery.config import Config
from condery.registry.base_image import (
    RECORD_KIND,
    SCRATCH,
    BaseImageError,
    resolve_base_image,
    scan_layer,
)
from condery.registry.media_types import OCI_MANIFEST
from condery.registry.manifest import sha256_digest
from condery.registry.platforms import OciPlatform
from condery.registry.upstream import (
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
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


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
