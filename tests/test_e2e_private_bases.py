"""End to end: private, multi-platform and moving base images behind `condery serve`.

A base in a registry that requires Basic authentication (CNCF Distribution with
htpasswd), with credentials from a config.json named in condery's configuration or found
through DOCKER_CONFIG and a credential helper on PATH, pulls with skopeo and runs; wrong
credentials are a 503 that names the registry and says unauthorized, without the
password anywhere. A two-platform index gives each built platform its own child, and a
base pinned by tag follows the tag after base_image_refresh seconds.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.fixtures.clients import run_in_rootfs
from tests.fixtures.upstream import (
    BASIC_PASSWORD,
    BASIC_USER,
    Registry as Upstream,
    basic_auth_entry,
    docker_config,
    make_tar,
    write_layout,
    write_multi_platform_layout,
)
from tests.test_cache import TINY, tiny_channel
from tests.test_e2e import OCI_MANIFEST, Registry, condery, unpack
from tests.test_registry_auth import AMD64, HELPER, answer, write_helper
from condery.oci.platforms import OciPlatform

pytestmark = pytest.mark.e2e

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# The default search must not find the machine's own files (a developer's ~/.docker).
NO_DEFAULT_FILES = {"REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": "/nonexistent", "DOCKER_CONFIG": "/nonexistent"}


def manifest(registry: Registry, name: str, accept: tuple[str, ...] = (OCI_MANIFEST,)) -> tuple[str, dict]:
    status, headers, body = registry.get(f"/v2/{name}/manifests/latest", accept=accept)
    assert status == 200, body
    return headers["Docker-Content-Digest"], json.loads(body)


def blob_json(registry: Registry, name: str, digest: str) -> dict:
    status, _, body = registry.get(f"/v2/{name}/blobs/{digest}")
    assert status == 200
    return json.loads(body)


def test_private_base_with_credentials_from_a_config_json(
    tmp_path: Path, fixture_channel, base_layout, basic_registry: Upstream
) -> None:
    basic_registry.push(base_layout, "private/debian:bookworm", "bookworm")
    auth_file = docker_config(tmp_path / "auth" / "config.json",
                              {"auths": {basic_registry.host: basic_auth_entry(BASIC_USER, BASIC_PASSWORD)}})
    with condery(tmp_path, [str(fixture_channel)], f"{basic_registry.host}/private/debian:bookworm",
                 env=NO_DEFAULT_FILES, base_image_auth_file=str(auth_file)) as registry:
        rootfs = unpack(registry, "xz", tmp_path)
        result = run_in_rootfs(rootfs, ["/opt/conda/bin/xz", "--version"])
        assert result.returncode == 0 and "5.2.5" in result.stdout, result.stderr
    assert BASIC_PASSWORD not in (tmp_path / "condery.log").read_text()


def test_credential_helper_found_through_docker_config(tmp_path: Path, basic_registry: Upstream) -> None:
    basic_registry.push(write_layout(tmp_path / "base", [make_tar({"etc/x": b"x"})], tag="v1").path,
                        "private/small:v1", "v1")
    bin_dir = write_helper(tmp_path / "bin", answer(BASIC_USER, BASIC_PASSWORD))
    docker_config(tmp_path / "docker" / "config.json", {"credHelpers": {basic_registry.host: HELPER}})
    env = {**NO_DEFAULT_FILES, "DOCKER_CONFIG": str(tmp_path / "docker"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    channels = [str(tiny_channel(tmp_path / "channel"))]
    with condery(tmp_path, channels, f"{basic_registry.host}/private/small:v1", env=env) as registry:
        _, document = manifest(registry, TINY)
    assert (bin_dir / "stdin.log").read_text().split() == [basic_registry.host]
    assert document["layers"][0]["digest"] == write_layout(tmp_path / "again", [make_tar({"etc/x": b"x"})]).layer_digests[0]


def test_wrong_credentials_are_a_503_naming_the_registry(tmp_path: Path, basic_registry: Upstream) -> None:
    basic_registry.push(write_layout(tmp_path / "base", [make_tar({"etc/x": b"x"})], tag="v1").path,
                        "private/small:v1", "v1")
    wrong = "Wrong-Pa55word-also-secret"
    auth_file = docker_config(tmp_path / "auth" / "config.json",
                              {"auths": {basic_registry.host: basic_auth_entry(BASIC_USER, wrong)}})
    channels = [str(tiny_channel(tmp_path / "channel"))]
    with condery(tmp_path, channels, f"{basic_registry.host}/private/small:v1", env=NO_DEFAULT_FILES,
                 base_image_auth_file=str(auth_file)) as registry:
        status, headers, body = registry.get(f"/v2/{TINY}/manifests/latest")
        assert status == 503 and int(headers["Retry-After"]) > 0, body
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert basic_registry.host in error["message"] and "unauthorized" in error["message"], error
    for text in (body.decode(), (tmp_path / "condery.log").read_text()):
        assert wrong not in text and BASIC_PASSWORD not in text and str(auth_file) not in text


def test_two_platform_index_gives_each_platform_its_child(tmp_path: Path, upstream_registry: Upstream) -> None:
    arm64 = OciPlatform("linux", "arm64")  # no variant, as many registries list it
    layouts = write_multi_platform_layout(tmp_path / "multi", {
        AMD64: [make_tar({"etc/arch": b"amd64\n"})], arm64: [make_tar({"etc/arch": b"arm64\n"})]}, tag="v1")
    upstream_registry.push(tmp_path / "multi", "multi/base:v1", "v1", all_platforms=True)
    channels = [str(tiny_channel(tmp_path / "channel", subdirs=("linux-64", "linux-aarch64")))]
    base = f"{upstream_registry.host}/multi/base:v1"
    with condery(tmp_path, channels, base, platforms=["linux-64", "linux-aarch64"]) as registry:
        _, index = manifest(registry, TINY, accept=(OCI_INDEX,))
        seen = {}
        for child in index["manifests"]:
            status, _, body = registry.get(f"/v2/{TINY}/manifests/{child['digest']}", accept=(OCI_MANIFEST,))
            assert status == 200
            config = blob_json(registry, TINY, json.loads(body)["config"]["digest"])
            seen[(child["platform"]["architecture"], config["architecture"])] = config["rootfs"]["diff_ids"][0]
        assert seen == {("amd64", "amd64"): layouts[AMD64].diff_ids[0], ("arm64", "arm64"): layouts[arm64].diff_ids[0]}
    (tmp_path / "s390x").mkdir()
    with condery(tmp_path / "s390x", channels, base, platforms=["linux-64", "linux-s390x"]) as registry:
        status, _, body = registry.get(f"/v2/{TINY}/manifests/latest")
        assert status == 503, body
        message = json.loads(body)["errors"][0]["message"]
        assert f"base image {base}" in message and "no manifest for linux/s390x" in message, message


def test_a_moved_tag_makes_new_images_after_the_refresh(tmp_path: Path, upstream_registry: Upstream) -> None:
    def push(text: str):  # type: ignore[no-untyped-def]
        layout = write_layout(tmp_path / text, [make_tar({"etc/base-version": text.encode()})], tag="v1")
        upstream_registry.push(layout.path, "moving/base:v1", "v1")
        return layout

    first = push("one")
    channels = [str(tiny_channel(tmp_path / "channel"))]
    with condery(tmp_path, channels, f"{upstream_registry.host}/moving/base:v1", base_image_refresh=1) as registry:
        before, document = manifest(registry, TINY)
        assert document["layers"][0]["digest"] == first.layer_digests[0]
        second = push("two")
        time.sleep(1.5)
        after, document = manifest(registry, TINY)
        assert after != before and document["layers"][0]["digest"] == second.layer_digests[0]
        # the registry goes away: the last good base keeps serving (stale-if-error)
        upstream_registry.stop()
        time.sleep(1.5)
        assert manifest(registry, TINY)[0] == after
    assert "refresh failed, using the base resolved before" in (tmp_path / "condery.log").read_text()
