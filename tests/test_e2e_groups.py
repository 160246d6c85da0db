"""End to end: an image whose packages are grouped under the layer budget, pulled and run
by podman (containers/storage refuses a layer that holds a path twice: a group must hold
one entry a path) and unpacked by umoci. A group of large layers is its layers'
compressed members copied (concat.py), their shared directories written once; a group of
small layers is recompressed (concat.worth_concatenating). Both kinds are pulled here."""

from __future__ import annotations

import json
import tarfile
import zlib
from pathlib import Path

import pytest

from condery.layers.concat import worth_concatenating
from tests.fixtures.clients import run_in_rootfs, skopeo_copy, umoci_unpack
from tests.test_e2e import condery

pytestmark = pytest.mark.e2e


# The base has one layer and the environment layer counts: a budget of 3 leaves room for
# one package layer (every package in one group, python's 20 MB among them: concatenated);
# 6 leaves the largest alone and groups the two smallest (tiny: recompressed).
@pytest.mark.parametrize("budget,concatenated", [(3, True), (6, False)])
def test_a_grouped_image_pulls_and_runs(tmp_path: Path, fixture_channel: Path, base_layout: Path, podman,
                                        budget: int, concatenated: bool) -> None:
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm", layer_budget=budget) as registry:
        ref = f"{registry.host}/python/tqdm/xz:latest"
        podman.pull(ref)
        result = podman.run(ref, ["python", "-c", "import tqdm; print('tqdm', tqdm.__version__)"])
        assert "tqdm 4.54.1" in result.stdout, result.stderr
        layout = tmp_path / "oci"
        skopeo_copy(f"docker://{ref}", layout, "latest")
        index = json.loads((layout / "index.json").read_text())
        manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
        groups = [d for d in manifest["layers"]
                  if len(d.get("annotations", {}).get("org.condery.packages", "").split()) > 1]
        assert len(groups) == 1, manifest["layers"]
        grouped = groups[0]["annotations"]["org.condery.packages"].split()
        packages = len(grouped)
        # Which kind the group is follows from its layers' sizes (their records in the store).
        sizes = {}
        for record in (registry.store / "records" / "layers").rglob("*.json"):
            entry = json.loads(record.read_text())
            if len(entry.get("packages", [])) == 1:
                sizes[entry["packages"][0]] = entry["size"]
        assert worth_concatenating([sizes[name] for name in grouped]) == concatenated
        # Concatenated: the directories' member(s), at least one member per package (each
        # package's entries end on a member boundary), the end member. Recompressed: fewer.
        members = gzip_members((layout / "blobs" / "sha256" / groups[0]["digest"][7:]).read_bytes())
        assert (members >= packages + 2) == concatenated, (members, packages)
        for blob in (layout / "blobs" / "sha256").iterdir():
            if blob.read_bytes()[:2] == b"\x1f\x8b":  # a layer: one entry a path
                with tarfile.open(blob) as tar:
                    names = tar.getnames()
                assert len(names) == len(set(names)), blob.name
        rootfs = umoci_unpack(layout, "latest", tmp_path / "bundle")
        ran = run_in_rootfs(rootfs, ["/opt/conda/bin/xz", "--version"])
        assert ran.returncode == 0 and "5.2.5" in ran.stdout


def gzip_members(data: bytes) -> int:
    count = 0
    while data:
        inflate = zlib.decompressobj(31)
        inflate.decompress(data)
        assert inflate.eof
        data = inflate.unused_data
        count += 1
    return count
