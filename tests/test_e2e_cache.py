"""End to end: the cache rules and error semantics through a real `condery serve`.

A configuration change across a restart on the same store is served at once (no image
of the old configuration), `latest` and a date with the same packages are one manifest,
a platform that does not solve is left out of the index, and a channel fault is a 503.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.http_channel import faulty_channel
from tests.test_cache import TINY, tiny_channel
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def manifest(registry: Registry, name: str, tag: str = "latest", accept=(OCI_MANIFEST,)) -> tuple[str, dict]:
    status, headers, body = registry.get(f"/v2/{name}/manifests/{tag}", accept=accept)
    assert status == 200, body
    return headers["Docker-Content-Digest"], json.loads(body)


def conda_prefix(registry: Registry, name: str) -> str:
    _, document = manifest(registry, name)
    status, _, body = registry.get(f"/v2/{name}/blobs/{document['config']['digest']}")
    assert status == 200
    env = dict(item.split("=", 1) for item in json.loads(body)["config"]["Env"])
    return env["CONDA_PREFIX"]


def test_a_changed_configuration_is_served_after_a_restart(tmp_path: Path, base_layout: Path) -> None:
    channels = [str(tiny_channel(tmp_path / "channel"))]
    base = f"oci:{base_layout}:bookworm"
    with condery(tmp_path, channels, base) as registry:
        assert conda_prefix(registry, TINY) == "/opt/conda"
        first, document = manifest(registry, TINY)
        assert "org.opencontainers.image.ref.name" not in document.get("annotations", {})
        # The tag is not in the manifest: a date with the same packages is the same image.
        assert manifest(registry, TINY, "2024-06-01")[0] == first
    with condery(tmp_path, channels, base, prefix="/srv/env") as registry:
        assert conda_prefix(registry, TINY) == "/srv/env"
    with condery(tmp_path, channels, base) as registry:  # and back: the first image again
        assert manifest(registry, TINY)[0] == first


def test_platforms_that_do_not_solve_are_left_out(tmp_path: Path) -> None:
    channels = [str(tiny_channel(tmp_path / "channel"))]  # linux-64 only
    with condery(tmp_path, channels, "scratch", platforms=["linux-64", "linux-aarch64"]) as registry:
        _, index = manifest(registry, TINY, accept=(OCI_INDEX, OCI_MANIFEST))
        assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64"]
        status, code, message = registry.error_code("/v2/condery-nowhere/manifests/latest")
        assert (status, code) == (404, "MANIFEST_UNKNOWN")
        assert "linux-64:" in message and "linux-aarch64:" in message
    assert "linux-aarch64" in (tmp_path / "condery.log").read_text()


def test_a_channel_fault_is_503_with_retry_after(tmp_path: Path, base_layout: Path) -> None:
    with faulty_channel(tiny_channel(tmp_path / "channel")) as channel:
        channel.broken.add("repodata")
        with condery(tmp_path, [channel.url], f"oci:{base_layout}:bookworm") as registry:
            status, headers, body = registry.get(f"/v2/{TINY}/manifests/latest")
            error = json.loads(body)["errors"][0]
            assert (status, error["code"]) == (503, "UNAVAILABLE"), body
            assert int(headers["Retry-After"]) > 0 and error["message"]
            channel.broken.clear()
            assert manifest(registry, TINY)[0].startswith("sha256:")
