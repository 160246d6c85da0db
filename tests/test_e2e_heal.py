"""End to end: a truncated blob in the store heals before any client sees it, so that
the client's FIRST pull after a restart works, through a real `condery serve` and a
real skopeo.

A store's files are rewritten by other tools: a bad copy, a restore interrupted, a
crash under a backup tool leave a blob cut short under its own name. A registry that
trusted its records would hand out a manifest naming that blob, and the client's blob
GET would fail (skopeo checks every digest): the user's first pull fails, only a retry
works. condery checks every blob an image reaches against its descriptor's size before
the image's manifest is first served in a process (records/cache.py), every layer,
group and base record checks its blob's size (Store.has_blob), and a base whose layer
went is imported again (bases/resolve.py, build/service.py); a truncated blob is removed
and made again, with the same digest (layers and manifests are reproducible).

Each case builds `xz` (three small package layers on the fixture glibc base), stops the
server, cuts one blob to half its size (the base's layer, a package's layer, a group
layer), starts the server again and pulls: the first `skopeo copy` works, the manifest
digest is the one served before, and the blob is whole again. Then the same with
`condery verify --repair` run between the stop and the start.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests.test_e2e import Registry, condery
from tests.test_e2e_storage import manifest, pull_ok, sha256_file

pytestmark = pytest.mark.e2e

NAME = "xz"
XZ = "xz-5.2.5"


def manifest_doc(registry: Registry) -> dict:
    status, _, body = manifest(registry, NAME)
    assert status == 200, body
    return json.loads(body)


def packages_of(layer: dict) -> list[str]:
    return layer.get("annotations", {}).get("org.condery.packages", "").split()


def base_layer(document: dict, base_layout: Path) -> dict:
    """The base's layer: the manifest's first, and the layout's own blob (its largest)."""
    layer = document["layers"][0]
    assert (base_layout / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]).is_file(), layer
    assert not packages_of(layer)  # no conda package in it
    assert layer["size"] == max(entry["size"] for entry in document["layers"])
    return layer


def package_layer(document: dict, base_layout: Path) -> dict:
    (layer,) = [entry for entry in document["layers"] if any(p.startswith(XZ) for p in packages_of(entry))]
    assert len(packages_of(layer)) == 1, layer  # xz's own layer, not a group
    return layer


def group_layer(document: dict, base_layout: Path) -> dict:
    groups = [entry for entry in document["layers"] if len(packages_of(entry)) > 1]
    assert len(groups) == 1, document["layers"]
    return groups[0]


# layer_budget 4 = the base's one layer + the environment layer + 2 for xz's three
# packages (xz, libgcc-ng, _libgcc_mutex): the largest keeps its layer, two are merged.
CASES: Mapping[str, tuple[Callable[[dict, Path], dict], dict]] = {
    "base-layer": (base_layer, {}),
    "package-layer": (package_layer, {}),
    "group-layer": (group_layer, {"layer_budget": 4}),
}


def blob_file(registry: Registry, digest: str) -> Path:
    return registry.store / "blobs" / "sha256" / digest.split(":", 1)[1]


def truncate(path: Path) -> None:
    size = path.stat().st_size
    assert size > 1, path
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    assert sha256_file(path) != "sha256:" + path.name


def pulled_digest(layout: Path) -> str:
    """The manifest digest skopeo wrote into the OCI layout it pulled to."""
    (entry,) = json.loads((layout / "index.json").read_text())["manifests"]
    return entry["digest"]


def first_pull(registry: Registry, dest: Path) -> str:
    """One skopeo copy (a failure raises: no retry), then the digest the client got,
    which must be the one the registry names."""
    served = pull_ok(registry, NAME, dest)
    assert pulled_digest(dest) == served
    return served


def assert_whole(registry: Registry, document: dict) -> None:
    for entry in [document["config"], *document["layers"]]:
        path = blob_file(registry, entry["digest"])
        assert path.stat().st_size == entry["size"] and sha256_file(path) == entry["digest"], entry


def heal_after_truncation(tmp_path: Path, fixture_channel: Path, base_layout: Path, case: str,
                          env: Mapping[str, str] | None = None) -> None:
    """Build, stop, truncate the case's blob, start, pull once: the same image, whole.
    `env` goes to both servers (a scratch check of the old behaviour patches through it)."""
    pick, settings = CASES[case]
    channels, base = [str(fixture_channel)], f"oci:{base_layout}:bookworm"
    with condery(tmp_path, channels, base, env=env, **settings) as registry:
        good = first_pull(registry, tmp_path / "before")
        document = manifest_doc(registry)
        layer = pick(document, base_layout)
    if case == "group-layer":
        assert len(document["layers"]) == settings["layer_budget"], document["layers"]
    blob = blob_file(registry, layer["digest"])
    assert sha256_file(blob) == layer["digest"]
    truncate(blob)

    with condery(tmp_path, channels, base, env=env, **settings) as registry:
        assert first_pull(registry, tmp_path / "after") == good
        assert blob.stat().st_size == layer["size"] and sha256_file(blob) == layer["digest"]
        assert manifest_doc(registry) == document
        assert_whole(registry, document)
    # What the client holds is the same layer, byte for byte.
    pulled = tmp_path / "after" / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
    assert hashlib.sha256(pulled.read_bytes()).hexdigest() == blob.name


@pytest.mark.parametrize("case", list(CASES))
def test_a_truncated_blob_heals_before_the_first_pull(tmp_path: Path, fixture_channel, base_layout, case: str) -> None:
    heal_after_truncation(tmp_path, fixture_channel, base_layout, case)


def test_verify_repair_then_the_first_pull_works(tmp_path: Path, fixture_channel, base_layout) -> None:
    channels, base = [str(fixture_channel)], f"oci:{base_layout}:bookworm"
    with condery(tmp_path, channels, base) as registry:
        good = first_pull(registry, tmp_path / "before")
        document = manifest_doc(registry)
        layers = [package_layer(document, base_layout), base_layer(document, base_layout)]
    blobs = [blob_file(registry, layer["digest"]) for layer in layers]
    for blob in blobs:
        truncate(blob)

    # As the README documents it, with the configuration `condery serve` ran with.
    config = tmp_path / "condery.yaml"
    repaired = subprocess.run([sys.executable, "-m", "condery", "verify", "--config", str(config), "--repair"],
                              capture_output=True, text=True, timeout=300, check=False)
    assert repaired.returncode == 0, repaired.stderr
    for layer in layers:
        assert f"corrupt: {layer['digest']}" in repaired.stdout, repaired.stdout
    assert "2 corrupt, 2 removed" in repaired.stdout, repaired.stdout
    assert not any(blob.exists() for blob in blobs)

    with condery(tmp_path, channels, base) as registry:
        assert first_pull(registry, tmp_path / "after") == good
        assert manifest_doc(registry) == document
        for layer, blob in zip(layers, blobs):
            assert blob.stat().st_size == layer["size"] and sha256_file(blob) == layer["digest"]
        assert_whole(registry, document)

    clean = subprocess.run([sys.executable, "-m", "condery", "verify", "--config", str(config)],
                           capture_output=True, text=True, timeout=300, check=False)
    assert clean.returncode == 0 and " 0 corrupt" in clean.stdout, clean.stdout + clean.stderr
