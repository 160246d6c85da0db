"""End to end: configuration and bases that used to end in a traceback or a 500.

`condery serve --config FILE` with a bad file exits 2 naming each key; `condery config`
and `condery --version` run exactly as the README documents them; a base whose layer
is zstd or uncompressed pulls through skopeo and through the Docker-only Accept path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from condery.oci.media_types import DOCKER_LAYER_GZIP, DOCKER_MANIFEST, OCI_LAYER_GZIP
from tests.fixtures.base_image import BASE_TAG
from tests.fixtures.clients import run_in_rootfs
from tests.test_base_image import recompress_layers
from tests.test_e2e import OCI_MANIFEST, condery, unpack
from tests.test_e2e_bases import linked_copy

pytestmark = pytest.mark.e2e


def run_condery(*args: str) -> subprocess.CompletedProcess[str]:
    """`condery ARGS` as a user types it (this interpreter's condery, PYTHONPATH kept)."""
    return subprocess.run([sys.executable, "-m", "condery", *args], capture_output=True, text=True, timeout=60)


def test_serve_with_a_bad_file_exits_2_naming_each_key(tmp_path: Path) -> None:
    config = tmp_path / "condery.yaml"
    config.write_text(
        "port: '8080'\n"
        "storage: {backend: s3, bucket: b, redirect: 'no', path: /srv}\n"
        "platforms: [linux-64, osx-arm64]\n"
        "meta_packages: {dev.gt.1: [ipython]}\n"
        "alow_package_scripts: true\n"
        "channels: ['https://me:pa55word@example.org/t/tk-5ecret/c']\n"
        "allow_package_scripts: ture\n"
    )
    # As the README documents it: condery serve [--config FILE] ...
    result = run_condery("serve", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    keys = [line.removeprefix("condery: ").split(":")[0] for line in result.stderr.splitlines()]
    assert keys == ["alow_package_scripts", "port", "storage.redirect", "storage.path", "platforms[1]",
                    "meta_packages.dev.gt.1", "allow_package_scripts"], result.stderr
    assert "condery: storage.redirect: expected true or false, got 'no'" in result.stderr.splitlines()
    assert "pa55word" not in result.stderr and "tk-5ecret" not in result.stderr
    # Not YAML at all, and a file that is not there: one line each, exit 2 as well.
    config.write_text("port: [8080\n")
    broken = run_condery("serve", "--config", str(config))
    assert broken.returncode == 2 and len(broken.stderr.splitlines()) == 1 and "not valid YAML" in broken.stderr
    missing = run_condery("serve", "--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "No such file or directory" in missing.stderr
    assert "Traceback" not in broken.stderr + missing.stderr


def test_unusable_store_path_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    config = tmp_path / "condery.yaml"
    config.write_text(yaml.safe_dump({"storage": {"backend": "filesystem", "path": str(tmp_path / "file" / "store")},
                                      "base_image": "scratch"}))
    result = run_condery("serve", "--config", str(config), "--port", "0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("condery: Not a directory") and len(result.stderr.splitlines()) == 1


def test_condery_config_masks_a_channel_token(tmp_path: Path) -> None:
    config = tmp_path / "condery.yaml"
    config.write_text(yaml.safe_dump({
        "channels": ["https://example.org/t/tk-5ecret/private", "conda-forge"],
        "meta_packages": {"gh": {"specs": ["gh"], "env": {"GITHUB_TOKEN": "ghp_5ecret"}}},
        "port": 9000,
    }))
    # As the README documents it: condery config [--config FILE]
    result = run_condery("config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "tk-5ecret" not in result.stdout and "ghp_5ecret" not in result.stdout
    printed = yaml.safe_load(result.stdout)
    assert printed["channels"] == ["https://example.org/private", "conda-forge"]
    assert printed["meta_packages"]["gh"]["env"]["GITHUB_TOKEN"] == "***"
    assert printed["port"] == 9000 and printed["storage"] == {"backend": "filesystem", "path": "condery-data"}
    assert "# secrets masked or removed: channels[0], meta_packages.gh.env.GITHUB_TOKEN" in result.stdout
    # what it prints is a configuration `--config` reads back
    again = tmp_path / "effective.yaml"
    again.write_text(result.stdout)
    assert run_condery("config", "--config", str(again)).stdout.splitlines()[2:] == result.stdout.splitlines()[2:]


def test_condery_version() -> None:
    from importlib.metadata import version

    # As the README documents it: condery --version
    result = run_condery("--version")
    assert result.returncode == 0 and result.stdout == f"condery {version('condery')}\n", result.stderr


@pytest.mark.parametrize("compression", ["zstd", "tar"])
def test_zstd_or_uncompressed_base_pulls(compression: str, tmp_path: Path, fixture_channel, base_layout) -> None:
    base = linked_copy(base_layout, tmp_path / "base")
    recompress_layers(base, BASE_TAG, [compression])
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base}:{BASE_TAG}") as registry:
        # The Docker-only Accept path: a schema 2 manifest, every layer gzip.
        status, headers, body = registry.get("/v2/xz/manifests/latest", accept=(DOCKER_MANIFEST,))
        assert status == 200, body
        assert headers["Content-Type"] == DOCKER_MANIFEST
        docker_layers = json.loads(body)["layers"]
        assert {layer["mediaType"] for layer in docker_layers} == {DOCKER_LAYER_GZIP}
        status, _, body = registry.get("/v2/xz/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200, body
        oci_layers = json.loads(body)["layers"]
        assert {layer["mediaType"] for layer in oci_layers} == {OCI_LAYER_GZIP}
        assert [layer["digest"] for layer in oci_layers] == [layer["digest"] for layer in docker_layers]
        # the base layer served is the recompressed one, and unpacks to the config's diff_id
        status, _, blob = registry.get(f"/v2/xz/blobs/{oci_layers[0]['digest']}")
        assert status == 200 and blob[:2] == b"\x1f\x8b"
        status, _, config = registry.get(f"/v2/xz/blobs/{json.loads(body)['config']['digest']}")
        diff_id = json.loads(config)["rootfs"]["diff_ids"][0]
        assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == diff_id
        # skopeo pulls it, umoci unpacks it, and the base's shell runs xz
        rootfs = unpack(registry, "xz", tmp_path)
        result = run_in_rootfs(rootfs, ["/bin/sh", "-c", "/opt/conda/bin/xz --version"])
        assert result.returncode == 0 and "5.2.5" in result.stdout, result.stderr
