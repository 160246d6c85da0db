"""End to end: what a multi-platform `condery serve` answers each kind of client.

With `platforms: [linux-64, linux-aarch64]` a tag names an OCI index (and a Docker
manifest list). skopeo, which reads indexes, gets the index; a client that accepts only
single manifests gets the first configured platform's manifest, or the one its
User-Agent names, as CNCF Distribution serves manifest lists to old clients. `tzdata`
is noarch, so it solves for both platforms on the scratch base.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.clients import skopeo_inspect_raw
from tests.test_e2e import DOCKER_MANIFEST, OCI_MANIFEST, Registry, condery

pytestmark = pytest.mark.e2e

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
NAME = "tzdata"
PATH = f"/v2/{NAME}/manifests/latest"


def get_and_head(registry: Registry, accept: tuple[str, ...], user_agent: str | None = None) -> tuple[dict, bytes]:
    """Headers and body of a GET, after checking a HEAD names the same manifest."""
    answers = []
    for method in ("GET", "HEAD"):
        request = urllib.request.Request(registry.url + PATH, method=method)
        if accept:
            request.add_header("Accept", ", ".join(accept))
        if user_agent:
            request.add_header("User-Agent", user_agent)
        with urllib.request.urlopen(request, timeout=600) as answer:
            assert answer.status == 200
            answers.append((dict(answer.headers), answer.read()))
    (headers, body), (head_headers, head_body) = answers
    assert head_body == b""
    for name in ("Docker-Content-Digest", "Content-Type", "Content-Length"):
        assert head_headers[name] == headers[name], name
    assert headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    assert headers["Content-Type"] == json.loads(body)["mediaType"]
    return headers, body


def platform_of(registry: Registry, manifest: bytes) -> tuple[str, str]:
    """(os, architecture) from the config blob a manifest points to."""
    digest = json.loads(manifest)["config"]["digest"]
    status, _, config = registry.get(f"/v2/{NAME}/blobs/{digest}")
    assert status == 200
    document = json.loads(config)
    return document["os"], document["architecture"]


def child_digests(listing: bytes) -> dict[str, str]:
    """architecture -> digest of each entry of an index or manifest list."""
    return {entry["platform"]["architecture"]: entry["digest"] for entry in json.loads(listing)["manifests"]}


def test_single_manifest_clients_get_a_platform_manifest(
    tmp_path: Path, fixture_channel: Path
) -> None:
    with condery(tmp_path, [str(fixture_channel)], "scratch", platforms=["linux-64", "linux-aarch64"]) as registry:
        # skopeo reads indexes: it gets the index, as every client that accepts one.
        index = skopeo_inspect_raw(f"{registry.host}/{NAME}:latest")
        assert json.loads(index)["mediaType"] == OCI_INDEX
        oci_children = child_digests(index)
        assert set(oci_children) == {"amd64", "arm64"}
        headers, body = get_and_head(registry, (OCI_MANIFEST, OCI_INDEX))
        assert body == index
        headers, docker_list = get_and_head(registry, (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
        assert headers["Content-Type"] == DOCKER_MANIFEST_LIST
        docker_children = child_digests(docker_list)

        # Only the OCI manifest type: the first configured platform's manifest, not the index.
        headers, body = get_and_head(registry, (OCI_MANIFEST,))
        assert headers["Content-Type"] == OCI_MANIFEST
        assert headers["Docker-Content-Digest"] == oci_children["amd64"]
        assert platform_of(registry, body) == ("linux", "amd64")

        # Only Docker schema 2: the same, from the manifest list.
        headers, body = get_and_head(registry, (DOCKER_MANIFEST,))
        assert headers["Content-Type"] == DOCKER_MANIFEST
        assert headers["Docker-Content-Digest"] == docker_children["amd64"]
        assert platform_of(registry, body) == ("linux", "amd64")

        # A client whose User-Agent names its platform (Docker's does) gets that one.
        arm_docker = "docker/1.12.6 go/go1.6.4 kernel/6.1.0 os/linux arch/arm64"
        headers, body = get_and_head(registry, (DOCKER_MANIFEST,), user_agent=arm_docker)
        assert headers["Docker-Content-Digest"] == docker_children["arm64"]
        assert platform_of(registry, body) == ("linux", "arm64")

        # The manifest served is the one the digest names: a pull by digest agrees.
        by_digest = skopeo_inspect_raw(f"{registry.host}/{NAME}@{oci_children['amd64']}")
        assert json.loads(by_digest)["mediaType"] == OCI_MANIFEST


def test_first_configured_platform_is_the_default(tmp_path: Path, fixture_channel: Path) -> None:
    with condery(tmp_path, [str(fixture_channel)], "scratch", platforms=["linux-aarch64", "linux-64"]) as registry:
        headers, body = get_and_head(registry, (OCI_MANIFEST,))
        assert platform_of(registry, body) == ("linux", "arm64")
        headers, body = get_and_head(registry, (DOCKER_MANIFEST,))
        assert platform_of(registry, body) == ("linux", "arm64")
