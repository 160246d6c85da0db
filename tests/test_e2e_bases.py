"""End to end: hostile base images behind a real `condery serve` process.

A base that lists one layer thousands of times, or a local layout whose manifest does
not match its digest, must answer a clear 503 UNAVAILABLE within seconds, without a
server path in the body; a base that repeats a layer within the layer budget still
builds, and pulls and runs with real clients.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.fixtures.base_image import BASE_TAG
from tests.fixtures.clients import run_in_rootfs
from tests.test_base_image import break_manifest, repeat_layers
from tests.test_e2e import OCI_MANIFEST, Registry, condery, unpack

pytestmark = pytest.mark.e2e


def linked_copy(layout: Path, dest: Path) -> Path:
    """A copy of the cached glibc base layout whose blobs are hard links (no 2x disk);
    the helpers that change it write new files, never through a link."""
    shutil.copytree(layout, dest, copy_function=os.link)
    return dest


def assert_unavailable_without_paths(registry: Registry, name: str, *hidden: Path) -> str:
    started = time.monotonic()
    status, headers, body = registry.get(f"/v2/{name}/manifests/latest")
    elapsed = time.monotonic() - started
    assert status == 503, body
    assert int(headers["Retry-After"]) > 0
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    text = body.decode()
    for path in hidden:
        assert str(path) not in text, text
    assert "oci:" not in text and "/tmp/" not in text, text
    assert elapsed < 15, elapsed  # answered, not left waiting on 5,000 downloads
    return error["message"]


def test_base_repeating_a_layer_past_the_budget_is_503(tmp_path: Path, fixture_channel, base_layout) -> None:
    base = linked_copy(base_layout, tmp_path / "base")
    repeat_layers(base, BASE_TAG, 5000)
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base}:{BASE_TAG}") as registry:
        message = assert_unavailable_without_paths(registry, "xz", base)
        assert "5000 layers" in message and "layer_budget 100" in message, message
        # refused before any layer was copied: the store holds no blob at all
        blobs = registry.store / "blobs" / "sha256"
        assert not blobs.exists() or not list(blobs.iterdir())
        # and the server still answers the next client the same way
        assert_unavailable_without_paths(registry, "xz", base)


def test_layout_manifest_not_matching_its_digest_is_503(tmp_path: Path, fixture_channel, base_layout) -> None:
    base = linked_copy(base_layout, tmp_path / "base")
    break_manifest(base, BASE_TAG)
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base}:{BASE_TAG}") as registry:
        message = assert_unavailable_without_paths(registry, "xz", base)
        assert message.startswith("the base image's OCI layout: ") and "does not match its digest" in message


def test_base_repeating_a_layer_within_the_budget_builds(tmp_path: Path, fixture_channel, base_layout) -> None:
    base = linked_copy(base_layout, tmp_path / "base")
    repeat_layers(base, BASE_TAG, 3)
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base}:{BASE_TAG}") as registry:
        status, _, body = registry.get("/v2/xz/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200, body
        layers = [layer["digest"] for layer in json.loads(body)["layers"]]
        assert layers[0] == layers[1] == layers[2] != layers[3]
        # one stored copy of the repeated blob, and the image pulls, unpacks and runs
        assert layers[0].removeprefix("sha256:") in registry.blob_names()
        rootfs = unpack(registry, "xz", tmp_path)
        result = run_in_rootfs(rootfs, ["/opt/conda/bin/xz", "--version"])
        assert result.returncode == 0 and "5.2.5" in result.stdout, result.stderr
