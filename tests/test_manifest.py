"""Image configs, manifests and indexes: spec fields, determinism, media type mapping."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from condery.oci.media_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_FOREIGN_GZIP,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from condery.oci.manifest import (
    DEFAULT_PATH,
    Descriptor,
    ImageSettings,
    ManifestError,
    docker_manifest,
    docker_manifest_list,
    image_config,
    oci_index,
    oci_manifest,
    parse_descriptor,
    sha256_digest,
)
from condery.oci.platforms import OciPlatform, conda_subdir, oci_platform
from tests.fixtures.upstream import gzip_bytes, make_tar

AMD64 = OciPlatform("linux", "amd64")
ARM64 = OciPlatform("linux", "arm64", "v8")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
D1, D2, D3 = (sha256_digest(bytes([i])) for i in range(3))


def settings(**overrides: Any) -> ImageSettings:
    values: dict[str, Any] = dict(
        env={"CONDA_PREFIX": "/opt/conda", "LANG": "C.UTF-8"},
        path_prefix="/opt/conda/bin",
        labels={"org.condery.specs": "numpy"},
        user=None,
        workdir=None,
        cmd=None,
        created=datetime(2024, 6, 1, 12, 30, 5, tzinfo=timezone.utc),
    )
    values.update(overrides)
    return ImageSettings(**values)


def check_descriptor(desc: Any) -> None:
    """The OCI image-spec descriptor fields: mediaType, digest, size (int64)."""
    assert isinstance(desc["mediaType"], str) and desc["mediaType"]
    assert DIGEST_RE.match(desc["digest"])
    assert isinstance(desc["size"], int) and desc["size"] >= 0
    assert set(desc) <= {"mediaType", "digest", "size", "urls", "annotations", "platform", "artifactType", "data"}


def env_of(config: bytes) -> dict[str, str]:
    return dict(e.split("=", 1) for e in json.loads(config)["config"]["Env"])


# --- platforms ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subdir", "platform"),
    [
        ("linux-64", OciPlatform("linux", "amd64")),
        ("linux-aarch64", OciPlatform("linux", "arm64", "v8")),
        ("linux-ppc64le", OciPlatform("linux", "ppc64le")),
        ("linux-s390x", OciPlatform("linux", "s390x")),
    ],
)
def test_platform_mapping_round_trips(subdir: str, platform: OciPlatform) -> None:
    assert oci_platform(subdir) == platform
    assert conda_subdir(platform) == subdir


def test_unknown_subdir_is_refused() -> None:
    for subdir in ("win-64", "osx-arm64", "noarch", ""):
        with pytest.raises(ValueError, match="supported"):
            oci_platform(subdir)


def test_arm64_matches_index_entries_without_variant() -> None:
    assert ARM64.matches("linux", "arm64", None)
    assert ARM64.matches("linux", "arm64", "v8")
    assert not ARM64.matches("linux", "arm64", "v7")
    assert not AMD64.matches("linux", "arm64", None)


# --- image config -------------------------------------------------------------------


def test_scratch_config_has_spec_fields_and_our_layers() -> None:
    config = image_config(None, [D1, D2], settings(), AMD64, ["conda: zlib", "condery: environment"])
    doc = json.loads(config)
    assert doc["architecture"] == "amd64" and doc["os"] == "linux" and "variant" not in doc
    assert doc["created"] == "2024-06-01T12:30:05Z"
    assert doc["rootfs"] == {"type": "layers", "diff_ids": [D1, D2]}
    assert [h["created_by"] for h in doc["history"]] == ["conda: zlib", "condery: environment"]
    assert all(h["created"] == "2024-06-01T12:30:05Z" for h in doc["history"])
    env = env_of(config)
    assert env["PATH"] == "/opt/conda/bin:" + DEFAULT_PATH
    assert env["CONDA_PREFIX"] == "/opt/conda" and env["LANG"] == "C.UTF-8"
    assert doc["config"]["Labels"] == {"org.condery.specs": "numpy"}
    assert "User" not in doc["config"] and "Cmd" not in doc["config"]


def test_config_is_deterministic_bytes() -> None:
    args = (None, [D1], settings(), ARM64, ["x"])
    first, second = image_config(*args), image_config(*args)
    assert first == second and sha256_digest(first) == sha256_digest(second)
    assert b" " not in first.replace(b"C.UTF-8", b"")  # compact separators
    assert json.loads(first)["variant"] == "v8"
    # a naive timestamp is UTC, not local time
    naive = image_config(None, [D1], settings(created=datetime(2024, 6, 1, 12, 30, 5)), AMD64, ["x"])
    assert json.loads(naive)["created"] == "2024-06-01T12:30:05Z"


def test_base_config_is_merged_under_ours() -> None:
    base = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C", "TZ=UTC"],
            "Entrypoint": ["/entry"],
            "Cmd": ["bash"],
            "Labels": {"maintainer": "debian", "org.condery.specs": "old"},
            "Hostname": "builder",  # Docker container detail: not part of an image config
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [D3]},
        "history": [
            {"created": "2023-01-01T00:00:00Z", "created_by": "ADD rootfs"},
            {"created": "2023-01-01T00:00:00Z", "created_by": "CMD bash", "empty_layer": True},
        ],
    }
    ours = settings(user="1000", workdir="/home/jovyan", cmd=["jupyter", "lab"], env={"LANG": "C.UTF-8", "HOME": "/home/jovyan"})
    doc = json.loads(image_config(base, [D1, D2], ours, AMD64, ["a", "b"]))
    assert doc["rootfs"]["diff_ids"] == [D3, D1, D2]
    assert doc["config"]["Env"] == [
        "PATH=/opt/conda/bin:/usr/bin:/bin", "LANG=C.UTF-8", "TZ=UTC", "HOME=/home/jovyan",
    ]
    assert doc["config"]["Entrypoint"] == ["/entry"]
    assert doc["config"]["Cmd"] == ["jupyter", "lab"]
    assert doc["config"]["User"] == "1000" and doc["config"]["WorkingDir"] == "/home/jovyan"
    assert doc["config"]["Labels"] == {"maintainer": "debian", "org.condery.specs": "numpy"}
    assert "Hostname" not in doc["config"]
    assert [h["created_by"] for h in doc["history"]] == ["ADD rootfs", "CMD bash", "a", "b"]
    assert doc["history"][1]["empty_layer"] is True


def test_path_prefix_is_not_repeated_and_env_path_replaces_base() -> None:
    base = {"config": {"Env": ["PATH=/opt/conda/bin:/usr/bin"]}, "rootfs": {"type": "layers", "diff_ids": []}}
    assert env_of(image_config(base, [], settings(), AMD64, []))["PATH"] == "/opt/conda/bin:/usr/bin"
    ours = settings(env={"PATH": "/custom/bin:/usr/bin"})
    assert env_of(image_config(base, [], ours, AMD64, []))["PATH"] == "/opt/conda/bin:/custom/bin:/usr/bin"


def test_config_refuses_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="history"):
        image_config(None, [D1, D2], settings(), AMD64, ["only one"])
    with pytest.raises(ValueError, match="diff_id"):
        image_config(None, ["sha256:short"], settings(), AMD64, ["x"])
    with pytest.raises(ManifestError, match="diff_ids"):
        image_config({"rootfs": {"diff_ids": ["nope"]}}, [], settings(), AMD64, [])


# --- manifests ----------------------------------------------------------------------


CONFIG = Descriptor(OCI_CONFIG, D3, 123)
GZIP_LAYER = Descriptor(OCI_LAYER_GZIP, D1, 10)


def test_oci_manifest_fields() -> None:
    docker_typed = Descriptor(DOCKER_LAYER_GZIP, D2, 20)  # a Docker Hub base layer
    data = oci_manifest(CONFIG, [docker_typed, GZIP_LAYER], {"org.opencontainers.image.title": "numpy"})
    doc = json.loads(data)
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_MANIFEST
    check_descriptor(doc["config"])
    assert doc["config"]["mediaType"] == OCI_CONFIG
    for layer in doc["layers"]:
        check_descriptor(layer)
    assert [layer["mediaType"] for layer in doc["layers"]] == [OCI_LAYER_GZIP, OCI_LAYER_GZIP]
    assert [layer["digest"] for layer in doc["layers"]] == [D2, D1]
    assert doc["annotations"] == {"org.opencontainers.image.title": "numpy"}
    assert "annotations" not in json.loads(oci_manifest(CONFIG, [GZIP_LAYER], {}))
    assert data == oci_manifest(CONFIG, [docker_typed, GZIP_LAYER], {"org.opencontainers.image.title": "numpy"})


def test_docker_manifest_uses_docker_types_and_same_digests() -> None:
    doc = json.loads(docker_manifest(CONFIG, [GZIP_LAYER, Descriptor(DOCKER_LAYER_GZIP, D2, 20)]))
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == DOCKER_MANIFEST
    assert doc["config"] == {"mediaType": DOCKER_CONFIG, "digest": D3, "size": 123}
    assert doc["layers"] == [
        {"mediaType": DOCKER_LAYER_GZIP, "digest": D1, "size": 10},
        {"mediaType": DOCKER_LAYER_GZIP, "digest": D2, "size": 20},
    ]
    assert "annotations" not in doc


def test_zstd_and_foreign_layers() -> None:
    zstd = Descriptor(OCI_LAYER_ZSTD, D2, 20)
    oci = json.loads(oci_manifest(CONFIG, [zstd, GZIP_LAYER], {}))
    assert oci["layers"][0]["mediaType"] == OCI_LAYER_ZSTD
    with pytest.raises(ManifestError, match="only gzip"):
        docker_manifest(CONFIG, [zstd, GZIP_LAYER])
    foreign = Descriptor(DOCKER_LAYER_FOREIGN_GZIP, D2, 20, urls=("https://example.org/layer",))
    assert json.loads(oci_manifest(CONFIG, [foreign], {}))["layers"][0] == {
        "mediaType": OCI_LAYER_NONDIST_GZIP, "digest": D2, "size": 20, "urls": ["https://example.org/layer"],
    }
    assert json.loads(docker_manifest(CONFIG, [foreign]))["layers"][0]["mediaType"] == DOCKER_LAYER_FOREIGN_GZIP
    with pytest.raises(ManifestError, match="unsupported layer"):
        oci_manifest(CONFIG, [Descriptor("application/x-tar+bzip2", D1, 1)], {})


def test_indexes() -> None:
    oci_entries = [Descriptor(OCI_MANIFEST, D1, 100, platform=AMD64), Descriptor(OCI_MANIFEST, D2, 200, platform=ARM64)]
    doc = json.loads(oci_index(oci_entries, {"org.opencontainers.image.ref.name": "latest"}))
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    for entry in doc["manifests"]:
        check_descriptor(entry)
    assert [m["platform"] for m in doc["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    docker_entries = [Descriptor(DOCKER_MANIFEST, d.digest, d.size, platform=d.platform) for d in oci_entries]
    listing = json.loads(docker_manifest_list(docker_entries))
    assert listing["mediaType"] == DOCKER_MANIFEST_LIST
    assert listing["manifests"][1] == {
        "mediaType": DOCKER_MANIFEST, "digest": D2, "size": 200,
        "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
    }
    with pytest.raises(ManifestError):
        docker_manifest_list(oci_entries)  # OCI manifests cannot be listed there
    with pytest.raises(ManifestError, match="platform"):
        docker_manifest_list([Descriptor(DOCKER_MANIFEST, D1, 1)])
    with pytest.raises(ManifestError):
        oci_index([Descriptor(OCI_LAYER_GZIP, D1, 1)], None)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"mediaType": OCI_LAYER_GZIP, "digest": "sha256:abc", "size": 1},
        {"mediaType": OCI_LAYER_GZIP, "digest": "sha512:" + "a" * 128, "size": 1},
        {"mediaType": OCI_LAYER_GZIP, "digest": D1, "size": -1},
        {"mediaType": OCI_LAYER_GZIP, "digest": D1, "size": True},
        {"mediaType": OCI_LAYER_GZIP, "digest": D1, "size": "1"},
        {"digest": D1, "size": 1},
        {"mediaType": OCI_LAYER_GZIP, "digest": D1, "size": 1, "annotations": {"a": 1}},
        {"mediaType": OCI_MANIFEST, "digest": D1, "size": 1, "platform": {"os": "linux"}},
    ],
)
def test_parse_descriptor_refuses_malformed(raw: Any) -> None:
    with pytest.raises(ManifestError):
        parse_descriptor(raw)


def test_parse_descriptor_round_trip() -> None:
    desc = Descriptor(OCI_MANIFEST, D1, 5, {"k": "v"}, ARM64)
    assert parse_descriptor(json.loads(json.dumps(desc.to_json()))) == desc


def test_oci_image_tool_validates_a_layout_written_from_these_functions(tmp_path: Path) -> None:
    """A real validator agrees: layout, index, manifest and config are spec-valid."""
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    tar = make_tar({"opt/conda/bin/hello": b"#!/bin/sh\necho hi\n"})
    layer = gzip_bytes(tar)
    layer_desc = Descriptor(OCI_LAYER_GZIP, put(layer), len(layer))
    config = image_config(None, [sha256_digest(tar)], settings(cmd=["hello"]), AMD64, ["conda: hello"])
    config_desc = Descriptor(OCI_CONFIG, put(config), len(config))
    manifest = oci_manifest(config_desc, [layer_desc], {"org.opencontainers.image.title": "hello"})
    manifest_desc = Descriptor(
        OCI_MANIFEST, put(manifest), len(manifest),
        annotations={"org.opencontainers.image.ref.name": "latest"}, platform=AMD64,
    )
    (tmp_path / "index.json").write_bytes(oci_index([manifest_desc], None))
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp_path / "config.json").write_bytes(config)
    (tmp_path / "manifest.json").write_bytes(manifest)

    for argv in (
        ["--type", "image", "--ref", "name=latest", str(tmp_path)],
        ["--type", "config", str(tmp_path / "config.json")],
        ["--type", "manifest", str(tmp_path / "manifest.json")],
        ["--type", "imageIndex", str(tmp_path / "index.json")],
    ):
        result = subprocess.run(["oci-image-tool", "validate", *argv], capture_output=True, text=True)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    # and it notices a broken one, so the check above means something
    (tmp_path / "config.json").write_text('{"architecture": 5}')
    result = subprocess.run(["oci-image-tool", "validate", "--type", "config", str(tmp_path / "config.json")],
                            capture_output=True, text=True)
    assert result.returncode != 0


def _config_of(base_settings: dict, ours: ImageSettings) -> dict:
    base = {"rootfs": {"type": "layers", "diff_ids": []}, "config": base_settings}
    return json.loads(image_config(base, [], ours, AMD64, []))["config"]


def test_default_cmd_only_when_nothing_else_gives_one() -> None:
    fallback = settings(default_cmd=("/opt/conda/bin/bash",))
    assert _config_of({}, fallback)["Cmd"] == ["/opt/conda/bin/bash"]
    assert _config_of({"Cmd": ["bash"]}, fallback)["Cmd"] == ["bash"]  # the base's stays
    # An entrypoint of the base's would get our shell as its argument: no Cmd then.
    assert "Cmd" not in _config_of({"Entrypoint": ["/tini", "--"]}, fallback)
    assert _config_of({"Cmd": ["bash"]}, settings(cmd=("jupyterhub-singleuser",), default_cmd=("x",)))["Cmd"] == [
        "jupyterhub-singleuser"]


def test_entrypoint_drops_the_base_cmd_as_a_dockerfile_does() -> None:
    config = _config_of({"Cmd": ["bash"], "Entrypoint": ["/old"]}, settings(entrypoint=("tini", "--")))
    assert config["Entrypoint"] == ["tini", "--"] and "Cmd" not in config
    config = _config_of({"Cmd": ["bash"]}, settings(entrypoint=("tini", "--"), cmd=("python",)))
    assert (config["Entrypoint"], config["Cmd"]) == (["tini", "--"], ["python"])
