"""End to end: layers written by condery's compressor, pulled and unpacked by real clients.

gzip layers larger than one chunk are several gzip members (condery/layers/compression.py):
skopeo, umoci and the interpreter they unpack prove Go's readers take them as one stream.
A registry with `layer_compression: zstd` serves zstd layers under OCI manifests only:
skopeo pulls them (checking every digest), podman pulls, unpacks and runs them, and a
client that accepts only Docker schema 2 is told why it gets nothing. (Debian's umoci
0.4.7 and oci-image-tool refuse the zstd media type, so they check the gzip side only.)
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from condery.layers.compression import CHUNK_SIZE
from tests.fixtures.clients import oci_validate, run_in_rootfs, skopeo_copy, umoci_unpack
from tests.test_e2e import DOCKER_MANIFEST, OCI_MANIFEST, Registry, condery

pytestmark = pytest.mark.e2e

OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
PYTHON_CHECK = ["/opt/conda/bin/python", "-c", "import lzma, sys; print('ok', sys.prefix)"]


def gzip_members(blob: bytes) -> int:
    count, rest = 0, blob
    while rest:
        inflate = zlib.decompressobj(31)
        inflate.decompress(rest)
        assert inflate.eof
        rest, count = inflate.unused_data, count + 1
    return count


def oci_manifest(layout: Path) -> dict:
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_text())


@pytest.fixture(scope="module")
def zstd_registry(tmp_path_factory, fixture_channel, base_layout):
    tmp = tmp_path_factory.mktemp("condery-zstd")
    with condery(tmp, [str(fixture_channel)], f"oci:{base_layout}:bookworm", layer_compression="zstd") as running:
        yield running


def test_multi_member_gzip_layers_unpack_with_skopeo_and_umoci(tmp_path: Path, fixture_channel, base_layout) -> None:
    (tmp_path / "server").mkdir()
    with condery(tmp_path / "server", [str(fixture_channel)], f"oci:{base_layout}:bookworm") as registry:
        layout = skopeo_copy(f"{registry.host}/python/xz:latest", tmp_path / "oci", "latest")
    oci_validate(layout)
    layers = oci_manifest(layout)["layers"]
    python = max(layers, key=lambda layer: layer["size"])
    blob = (layout / "blobs" / "sha256" / python["digest"].removeprefix("sha256:")).read_bytes()
    assert len(blob) > CHUNK_SIZE and gzip_members(blob) > 1  # really several members
    rootfs = umoci_unpack(layout, "latest", tmp_path / "bundle")
    result = run_in_rootfs(rootfs, PYTHON_CHECK)
    assert result.returncode == 0 and "ok /opt/conda" in result.stdout, result.stderr


def test_zstd_layers_pull_with_skopeo(zstd_registry: Registry, tmp_path: Path) -> None:
    layout = skopeo_copy(f"{zstd_registry.host}/python/xz:latest", tmp_path / "oci", "latest")
    manifest = oci_manifest(layout)
    assert manifest["mediaType"] == OCI_MANIFEST
    ours = [layer for layer in manifest["layers"] if "org.condery.packages" in layer.get("annotations", {})]
    assert len(ours) >= 3  # python, xz (and what they depend on) and the environment layer
    for layer in manifest["layers"]:
        if layer not in ours:  # the base's layers stay gzip: valid in an OCI manifest
            assert layer["mediaType"].endswith("tar+gzip")
    for layer in ours:
        assert layer["mediaType"] == OCI_LAYER_ZSTD
        assert (layout / "blobs/sha256" / layer["digest"].removeprefix("sha256:")).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"


def test_zstd_image_runs_in_podman(zstd_registry: Registry, podman) -> None:
    ref = f"{zstd_registry.host}/python/xz"
    podman.pull(ref)
    result = podman.run(ref, ["python", "-c", "import lzma, sys; print('ok', sys.prefix)"])
    assert result.returncode == 0 and "ok /opt/conda" in result.stdout, result.stderr
    assert podman.run(ref, ["xz", "--version"]).stdout.startswith("xz (XZ Utils)")


def test_zstd_negotiation(zstd_registry: Registry) -> None:
    path = "/v2/xz/manifests/latest"
    # Docker 23+ and containerd prefer Docker types and list OCI ones: they get OCI.
    status, headers, body = zstd_registry.get(path, accept=(DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST))
    assert status == 200 and headers["Content-Type"] == OCI_MANIFEST
    assert json.loads(body)["mediaType"] == OCI_MANIFEST
    # A client that reads Docker schema 2 only cannot unpack zstd: a clear 404, no 500.
    status, _, body = zstd_registry.get(path, accept=(DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
    assert status == 404, body
    error = json.loads(body)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN" and "zstd" in error["message"] and "OCI" in error["message"]
    # HEAD answers the same (containerd asks HEAD first).
    status, _, _ = zstd_registry.get(path, method="HEAD", accept=(DOCKER_MANIFEST,))
    assert status == 404
