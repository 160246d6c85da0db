"""End to end: a real `condery serve` process, pulled from by real OCI clients.

The registry serves the fixture channel (a python packaged from this interpreter, real
anaconda packages, generated edge cases) on top of a glibc base image built from Debian
packages, and skopeo, oci-image-tool, umoci, bwrap and podman do what users do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.fixtures.clients import oci_validate, run_in_rootfs, skopeo_copy, umoci_unpack
from tests.fixtures.procs import free_port, running
from tests.fixtures.python_package import python_version

pytestmark = pytest.mark.e2e

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Registry:
    url: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT
    store: Path

    def get(self, path: str, *, method: str = "GET", accept: tuple[str, ...] = ()) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.url + path, method=method)
        for value in accept:
            request.add_header("Accept", value)
        if len(accept) > 1:
            # urllib keeps one value per header name; send the several lines clients send.
            request.headers.pop("Accept", None)
            request.unredirected_hdrs["Accept"] = ", ".join(accept)
        try:
            with urllib.request.urlopen(request, timeout=600) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def error_code(self, path: str) -> tuple[int, str, str]:
        status, _, body = self.get(path)
        assert status != 500, body
        error = json.loads(body)["errors"][0]
        return status, error["code"], error["message"]

    def layer_keys(self) -> set[str]:
        root = self.store / "records" / "layers"
        return {p.relative_to(root).as_posix() for p in root.rglob("*.json")} if root.exists() else set()

    def blob_names(self) -> set[str]:
        return {p.name for p in (self.store / "blobs" / "sha256").iterdir()}


def serve(tmp: Path, channels: list[str], base_image: str, **extra) -> tuple[list[str], Path, int]:
    port = free_port()
    config = {
        "channels": channels,
        "base_image": base_image,
        "storage": {"backend": "filesystem", "path": str(tmp / "store")},
        "package_cache": str(tmp / "pkgs"),
        **extra,
    }
    config_path = tmp / "condery.yaml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "condery", "serve", "--config", str(config_path), "--port", str(port)]  # as documented
    return argv, tmp / "store", port


@contextlib.contextmanager
def condery(tmp: Path, channels: list[str], base_image: str, env: dict | None = None, **extra) -> Iterator[Registry]:
    """A `condery serve` process for one test, stopped by pid afterwards."""
    argv, store, port = serve(tmp, channels, base_image, **extra)
    url = f"http://127.0.0.1:{port}"
    with running(argv, url=url + "/v2/", env=env, log_path=tmp / "condery.log", timeout=60):
        yield Registry(url, f"127.0.0.1:{port}", store)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, fixture_channel, base_layout):
    tmp = tmp_path_factory.mktemp("condery")
    with condery(tmp, [str(fixture_channel)], f"oci:{base_layout}:bookworm") as running_registry:
        yield running_registry


def unpack(registry: Registry, name: str, tmp: Path) -> Path:
    layout = tmp / "oci"
    skopeo_copy(f"docker://{registry.host}/{name}:latest", layout, "latest")
    oci_validate(layout)
    bundle = tmp / "bundle"
    umoci_unpack(layout, "latest", bundle)
    return bundle / "rootfs"


def test_pull_unpack_and_run(registry: Registry, tmp_path: Path) -> None:
    rootfs = unpack(registry, "python/tqdm/xz", tmp_path)
    assert (rootfs / "opt/conda/conda-meta/history").exists()
    lock = (rootfs / "opt/conda/conda-meta/explicit.txt").read_text()
    assert "@EXPLICIT" in lock and "#sha256:" in lock

    for argv, expected in [
        (["/opt/conda/bin/python", "-c", "import tqdm, sys; print(tqdm.__version__, sys.prefix)"], "4.54.1 /opt/conda"),
        # The interpreter keeps its version after prefix replacement (sys.version is intact).
        (["/opt/conda/bin/python", "-c", "import platform; print(platform.python_version())"], python_version()),
        (["/opt/conda/bin/tqdm", "--version"], "4.54.1"),
        (["/opt/conda/bin/xz", "--version"], "xz (XZ Utils) 5.2.5"),
        (["/bin/sh", "-c", "echo $PATH"], None),
    ]:
        result = run_in_rootfs(rootfs, argv)
        assert result.returncode == 0, result.stderr
        if expected:
            assert expected in result.stdout, result.stdout

    # No build-machine path anywhere in the package records.
    for record in (rootfs / "opt/conda/conda-meta").glob("*.json"):
        text = record.read_text()
        assert "extracted_package_dir" not in text and str(registry.store) not in text, record


def test_same_name_same_digest_and_shared_layers(registry: Registry) -> None:
    def digest(name: str) -> str:
        status, headers, _ = registry.get(f"/v2/{name}/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200
        return headers["Docker-Content-Digest"]

    first = digest("xz/tzdata")
    assert digest("xz/tzdata") == first
    assert digest("tzdata/xz") == first
    assert digest("tzdata/xz/xz") == first

    before = registry.layer_keys()
    digest("tzdata/xz/condery-empty")
    added = registry.layer_keys() - before
    assert len(added) == 1, added  # only condery-empty's layer is new


def test_docker_only_client_gets_schema2(registry: Registry) -> None:
    status, headers, body = registry.get("/v2/xz/manifests/latest", accept=(DOCKER_MANIFEST,))
    assert status == 200
    assert headers["Content-Type"] == DOCKER_MANIFEST
    assert json.loads(body)["mediaType"] == DOCKER_MANIFEST
    status, headers, _ = registry.get("/v2/xz/manifests/latest", method="HEAD")
    assert status == 200 and headers["Content-Type"] == OCI_MANIFEST


def test_bad_input_answers_spec_errors(registry: Registry) -> None:
    for name in ["Python", "python//xz", "python/xz.gtx.1", "-x"]:
        status, code, message = registry.error_code(f"/v2/{name}/manifests/latest")
        assert (status, code) == (400, "NAME_INVALID") or (status, code) == (404, "NAME_UNKNOWN"), (name, code)
    status, code, message = registry.error_code("/v2/Python/manifests/latest")
    assert code == "NAME_INVALID" and "operators" in message

    status, code, message = registry.error_code("/v2/no-such-package/manifests/latest")
    assert (status, code) == (404, "MANIFEST_UNKNOWN")
    assert "no-such-package" in message

    images_before = sorted((registry.store / "records").rglob("*"))
    status, code, _ = registry.error_code("/v2/xz/manifests/not-a-tag!")
    assert status == 404
    status, code, _ = registry.error_code("/v2/condery-hello/manifests/2024-13-01")
    assert (status, code) == (404, "MANIFEST_UNKNOWN")
    assert sorted((registry.store / "records").rglob("*")) == images_before  # nothing solved or built

    status, code, _ = registry.error_code("/v2/xz/blobs/sha256:" + "0" * 64)
    assert (status, code) == (404, "BLOB_UNKNOWN")
    status, code, _ = registry.error_code("/v2/xz/blobs/sha256:xyz")
    assert status in (400, 404) and code in ("DIGEST_INVALID", "BLOB_UNKNOWN")


def test_podman_pull_and_run(registry: Registry, podman) -> None:
    ref = f"{registry.host}/python/tqdm"
    podman.pull(ref)
    result = podman.run(ref, ["python", "-c", "import tqdm; print('tqdm', tqdm.__version__)"])
    assert "tqdm 4.54.1" in result.stdout


def test_malformed_package_refused_and_nothing_stored(tmp_path: Path, base_layout, malformed_channel) -> None:
    with condery(tmp_path, [str(malformed_channel)], f"oci:{base_layout}:bookworm") as registry:
        store = registry.store
        status, code, message = registry.error_code("/v2/ca-certificates/manifests/latest")
        assert (status, code) == (404, "MANIFEST_UNKNOWN")
        assert "ca-certificates" in message
        assert registry.layer_keys() == set()
        # Only the base image was imported: no layer, config or manifest of the failed image.
        base_blobs = {p.name for p in (base_layout / "blobs" / "sha256").iterdir()}
        assert registry.blob_names() <= base_blobs
        assert not list((store / "tmp").iterdir())  # no half-written file left behind


def test_sha256_mismatch_refused(tmp_path: Path, base_layout, bad_hash_channel) -> None:
    with condery(tmp_path, [str(bad_hash_channel)], f"oci:{base_layout}:bookworm") as registry:
        status, code, message = registry.error_code("/v2/condery-badhash/manifests/latest")
        assert (status, code) == (404, "MANIFEST_UNKNOWN")
        assert "sha256" in message.lower()
        assert registry.layer_keys() == set()


def test_cli_build_and_solve(tmp_path: Path, fixture_channel, base_layout) -> None:
    config = tmp_path / "condery.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "channels": [str(fixture_channel)],
                "base_image": f"oci:{base_layout}:bookworm",
                "storage": {"backend": "filesystem", "path": str(tmp_path / "store")},
            }
        )
    )
    cli = [sys.executable, "-m", "condery", "--config", str(config)]
    solved = subprocess.run([*cli, "solve", "xz/tzdata"], capture_output=True, text=True, check=True)
    assert "@EXPLICIT" in solved.stdout and "xz-5.2.5-h7b6447c_0.conda#sha256:" in solved.stdout

    out = tmp_path / "layout"
    subprocess.run([*cli, "build", "tzdata/xz", "--output", f"oci:{out}"], check=True, capture_output=True)
    oci_validate(out)
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"

    failed = subprocess.run([*cli, "solve", "no-such-package"], capture_output=True, text=True)
    assert failed.returncode != 0 and "no-such-package" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.parametrize("auth", ["anonymous-token", "none"])
def test_base_image_from_upstream_registry(
    auth: str, tmp_path: Path, fixture_channel, base_layout, request: pytest.FixtureRequest
) -> None:
    """The base comes from a CNCF Distribution registry, pinned by digest, as from Docker Hub."""
    upstream = request.getfixturevalue("token_registry" if auth == "anonymous-token" else "upstream_registry")
    upstream.push(base_layout, "library/debian:bookworm", "bookworm")
    manifest = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{upstream.host}/library/debian:bookworm"],
        capture_output=True, check=True,
    ).stdout
    pinned = f"{upstream.host}/library/debian:bookworm@sha256:{hashlib.sha256(manifest).hexdigest()}"

    with condery(tmp_path, [str(fixture_channel)], pinned) as registry:
        rootfs = unpack(registry, "xz", tmp_path)
        result = run_in_rootfs(rootfs, ["/opt/conda/bin/xz", "--version"])
        assert result.returncode == 0 and "5.2.5" in result.stdout, result.stderr
    if upstream.token_server is not None:
        assert any("library/debian:pull" in str(r) for r in upstream.token_server.requests)


def test_s3_store_with_redirects(tmp_path: Path, fixture_channel, base_layout, seaweed) -> None:
    """The same pull with the store in a real S3 server; blob GETs are 307s to presigned URLs."""
    bucket = seaweed.create_bucket()
    storage = {"backend": "s3", "bucket": bucket, "endpoint_url": seaweed.endpoint_url,
               "region": "us-east-1", "redirect": True}
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm", env=seaweed.env,
                 storage=storage) as registry:
        url = registry.url
        rootfs = unpack(registry, "xz", tmp_path)
        result = run_in_rootfs(rootfs, ["/opt/conda/bin/xz", "--version"])
        assert result.returncode == 0 and "5.2.5" in result.stdout, result.stderr
        status, headers, body = registry.get("/v2/xz/manifests/latest")
        layer = json.loads(body)["layers"][-1]["digest"]
        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(f"{url}/v2/xz/blobs/{layer}")
            raise AssertionError("expected a redirect")
        except urllib.error.HTTPError as error:
            assert error.code == 307 and seaweed.endpoint_url in error.headers["Location"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None
