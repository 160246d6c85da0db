"""The pull API over HTTP, against a real FilesystemStore holding real blobs.

The ImageService here is a small in-test class answering for blobs the test stored: this
is the HTTP layer's unit test. End-to-end tests through skopeo/podman against the real
builder live in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import resource
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
from aiohttp import ClientResponse
from hypothesis import given, settings
from hypothesis import strategies as st
from aiohttp.test_utils import TestClient

from condery.image.meta import DEFAULT_META_PACKAGES, MetaPackage
from condery.config import ConfigError, load_config
from condery.observability.logs import FIELDS
from condery.registry.connections import (
    ConnectionLimits,
    Throttled,
    default_max_connections,
    default_max_connections_per_client,
    serving,
)
from condery.oci.errors import ManifestUnknown, RegistryError, TooManyRequests, Unavailable
from condery.image.names import ImageRef, ImageRequest, parse_name
from condery.oci.media_types import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from condery.registry.server import create_app, parse_range, RangeNotSatisfiable
from condery.image.tags import Latest, Snapshot
from condery.storage import StorageError
from condery.storage.filesystem import FilesystemStore

SKOPEO_ACCEPT = [
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
]
UNKNOWN_DIGEST = "sha256:" + "0" * 64


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer() -> bytes:
    """A real gzip'd tar, bigger than the store's 1 MiB read chunk."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        payload = os.urandom(3 * 1024 * 1024 + 17)
        info = tarfile.TarInfo("opt/conda/lib/libdata.so")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return gzip.compress(buffer.getvalue(), mtime=0)


def make_manifest(media_type: str, config_type: str, layer_type: str, config: bytes, layer: bytes) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": config_type, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": layer_type, "digest": sha256(layer), "size": len(layer)}],
    }
    return json.dumps(document, sort_keys=True).encode()


@dataclass
class Image:
    layer: bytes
    config: bytes
    oci: bytes
    docker: bytes
    index: bytes

    @property
    def ref(self) -> ImageRef:
        return ImageRef(sha256(self.oci), OCI_MANIFEST, sha256(self.docker), DOCKER_MANIFEST)


@dataclass
class InTestService:
    """Answers for the image the test stored; records what it was asked."""

    image: Image
    meta_packages: Mapping[str, MetaPackage] = field(default_factory=lambda: dict(DEFAULT_META_PACKAGES))
    known_tags: dict[str, list[str]] = field(default_factory=dict)
    failure: BaseException | None = None
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # a resolve call has begun
    left: asyncio.Event = field(default_factory=asyncio.Event)  # a resolve call was withdrawn
    resolved: list[tuple[ImageRequest, Latest | Snapshot]] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    finished: int = 0
    withdrawn: int = 0  # resolve calls cancelled because their client went away
    # A multi-platform image instead of `image` (see the `multi` fixture).
    ref: ImageRef | None = None
    media_types: dict[str, str] = field(default_factory=dict)

    async def request_for(self, name: str, channels: Sequence[str] | None = None) -> ImageRequest:
        return parse_name(name, self.meta_packages)

    async def holds(self, request: ImageRequest, digest: str) -> bool:
        """Every name of this stand-in is its one image, which names these blobs."""
        image = self.image
        return digest in {sha256(part) for part in (image.layer, image.config, image.oci, image.docker, image.index)}

    async def resolve(self, request: ImageRequest, reference: Latest | Snapshot, client: str = "local") -> ImageRef:
        self.resolved.append((request, reference))
        self.clients.append(client)
        self.entered.set()
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.withdrawn += 1
                self.left.set()
                raise
        if self.failure is not None:
            raise self.failure
        if "nothing-provides-this" in request.specs:
            raise ManifestUnknown("nothing provides nothing-provides-this needed by the request")
        self.finished += 1
        return self.ref or self.image.ref

    async def manifest_media_type(self, digest: str) -> str | None:
        return {
            sha256(self.image.oci): OCI_MANIFEST,
            sha256(self.image.docker): DOCKER_MANIFEST,
            sha256(self.image.index): OCI_INDEX,
            **self.media_types,
        }.get(digest)

    async def tags(self, request: ImageRequest) -> list[str]:
        return list(self.known_tags.get(request.canonical_name, []))


@pytest.fixture
async def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "store")


@pytest.fixture(scope="module")
def layer() -> bytes:
    return make_layer()


@pytest.fixture
async def image(store: FilesystemStore, layer: bytes) -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    oci = make_manifest(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP, config, layer)
    docker = make_manifest(DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP, config, layer)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(oci), "size": len(oci)}],
        }
    ).encode()
    for blob in (layer, config, oci, docker, index):
        await store.put_blob_bytes(sha256(blob), blob)
    return Image(layer, config, oci, docker, index)


@pytest.fixture
def service(image: Image) -> InTestService:
    return InTestService(image)


@pytest.fixture
async def client(aiohttp_client: Any, service: InTestService, store: FilesystemStore) -> TestClient:
    return await aiohttp_client(create_app(service, store))


async def assert_error(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert response.content_type == "application/json"
    body = await response.json()
    assert [e["code"] for e in body["errors"]] == [code]
    assert set(body["errors"][0]) == {"code", "message", "detail"}
    assert "Traceback" not in json.dumps(body)
    return body["errors"][0]


# -- /v2/ ----------------------------------------------------------------------------


async def test_base(client: TestClient) -> None:
    for path in ("/v2/", "/v2"):
        response = await client.get(path)
        assert response.status == 200
        assert await response.json() == {}
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    response = await client.head("/v2/")
    assert response.status == 200
    await assert_error(await client.post("/v2/"), 405, "UNSUPPORTED")


async def test_unknown_paths_are_404_in_error_format(client: TestClient) -> None:
    # "/" is the landing page (tests/test_landing.py).
    await assert_error(await client.get("/v1/_ping"), 404, "NAME_UNKNOWN")
    await assert_error(await client.get("/v2/numpy/somewhere"), 404, "NAME_UNKNOWN")
    await assert_error(await client.get("/v2/numpy/tags"), 404, "NAME_UNKNOWN")
    await assert_error(await client.get("/v2/_catalog"), 404, "NAME_UNKNOWN")


# -- manifests -----------------------------------------------------------------------


async def test_manifest_by_tag_with_skopeo_accept_lines(client: TestClient, service: InTestService) -> None:
    response = await client.get(
        "/v2/scipy/numpy/manifests/latest", headers=[("Accept", a) for a in SKOPEO_ACCEPT]
    )
    assert response.status == 200
    body = await response.read()
    assert body == service.image.oci
    digest = sha256(body)
    assert response.headers["Content-Type"] == OCI_MANIFEST == json.loads(body)["mediaType"]
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Length"] == str(len(body))
    assert response.headers["ETag"] == f'"{digest}"'
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    [(request, reference)] = service.resolved
    assert request.canonical_name == "numpy/scipy" and request.specs == ("numpy", "scipy")
    assert reference == Latest()


async def test_docker_only_client_gets_the_docker_manifest(client: TestClient, service: InTestService) -> None:
    response = await client.get(
        "/v2/numpy/manifests/latest", headers=[("Accept", DOCKER_MANIFEST), ("Accept", DOCKER_MANIFEST_LIST)]
    )
    assert response.status == 200
    assert await response.read() == service.image.docker
    assert response.headers["Content-Type"] == DOCKER_MANIFEST
    assert response.headers["Docker-Content-Digest"] == sha256(service.image.docker)


async def test_no_accept_gets_oci(client: TestClient, service: InTestService) -> None:
    response = await client.get("/v2/numpy/manifests/latest", skip_auto_headers=["Accept"])
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_MANIFEST


@dataclass
class MultiPlatform:
    """An index and a manifest list over linux/amd64 (first, as configured) and linux/arm64/v8."""

    oci: dict[str, bytes]  # platform -> manifest
    docker: dict[str, bytes]
    index: bytes
    manifest_list: bytes


AMD64 = {"architecture": "amd64", "os": "linux"}
ARM64 = {"architecture": "arm64", "os": "linux", "variant": "v8"}


@pytest.fixture
async def multi(store: FilesystemStore, layer: bytes, service: InTestService) -> MultiPlatform:
    oci: dict[str, bytes] = {}
    docker: dict[str, bytes] = {}
    for name, platform in (("amd64", AMD64), ("arm64", ARM64)):
        config = json.dumps({**platform, "rootfs": {"type": "layers"}}, sort_keys=True).encode()
        oci[name] = make_manifest(OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP, config, layer)
        docker[name] = make_manifest(DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP, config, layer)
        await store.put_blob_bytes(sha256(config), config)

    def listing(media_type: str, child_type: str, children: dict[str, bytes]) -> bytes:
        entries = [
            {"mediaType": child_type, "digest": sha256(children[name]), "size": len(children[name]), "platform": p}
            for name, p in (("amd64", AMD64), ("arm64", ARM64))
        ]
        return json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()

    index = listing(OCI_INDEX, OCI_MANIFEST, oci)
    manifest_list = listing(DOCKER_MANIFEST_LIST, DOCKER_MANIFEST, docker)
    for blob, media_type in (
        *((b, OCI_MANIFEST) for b in oci.values()),
        *((b, DOCKER_MANIFEST) for b in docker.values()),
        (index, OCI_INDEX),
        (manifest_list, DOCKER_MANIFEST_LIST),
    ):
        await store.put_blob_bytes(sha256(blob), blob)
        service.media_types[sha256(blob)] = media_type
    service.ref = ImageRef(sha256(index), OCI_INDEX, sha256(manifest_list), DOCKER_MANIFEST_LIST)
    return MultiPlatform(oci, docker, index, manifest_list)


async def _get_and_head(client: TestClient, headers: list[tuple[str, str]]) -> tuple[bytes, Mapping[str, str]]:
    """The body of a GET of numpy:latest, after checking a HEAD answers the same manifest."""
    get = await client.get("/v2/numpy/manifests/latest", headers=headers, skip_auto_headers=["Accept"])
    assert get.status == 200, await get.text()
    body = await get.read()
    head = await client.head("/v2/numpy/manifests/latest", headers=headers, skip_auto_headers=["Accept"])
    assert head.status == 200
    for header in ("Docker-Content-Digest", "Content-Type", "Content-Length", "ETag"):
        assert head.headers[header] == get.headers[header], header
    assert get.headers["Docker-Content-Digest"] == sha256(body)
    assert get.headers["Content-Type"] == json.loads(body)["mediaType"]
    return body, get.headers


async def test_single_manifest_clients_get_the_first_platform_not_an_index(
    client: TestClient, multi: MultiPlatform
) -> None:
    body, _ = await _get_and_head(client, [("Accept", OCI_MANIFEST)])
    assert body == multi.oci["amd64"]
    body, _ = await _get_and_head(client, [("Accept", DOCKER_MANIFEST)])
    assert body == multi.docker["amd64"]
    # An old Docker client: schema 2 and schema 1, no manifest list.
    v1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    body, _ = await _get_and_head(client, [("Accept", f"{DOCKER_MANIFEST}, {v1}")])
    assert body == multi.docker["amd64"]


async def test_index_clients_get_the_index(client: TestClient, multi: MultiPlatform) -> None:
    for headers in ([("Accept", a) for a in SKOPEO_ACCEPT], [("Accept", OCI_MANIFEST), ("Accept", OCI_INDEX)], []):
        body, _ = await _get_and_head(client, headers)
        assert body == multi.index, headers
    body, _ = await _get_and_head(client, [("Accept", f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}")])
    assert body == multi.manifest_list


async def test_single_manifest_client_naming_its_platform_gets_it(client: TestClient, multi: MultiPlatform) -> None:
    arm_docker = "docker/1.12.6 go/go1.6.4 git-commit/78d1802 kernel/6.1.0 os/linux arch/arm64"
    body, _ = await _get_and_head(client, [("Accept", DOCKER_MANIFEST), ("User-Agent", arm_docker)])
    assert body == multi.docker["arm64"]
    body, _ = await _get_and_head(client, [("Accept", OCI_MANIFEST), ("User-Agent", arm_docker)])
    assert body == multi.oci["arm64"]
    # A platform the image lacks: the first configured one, as for a client naming none.
    s390x = arm_docker.replace("arm64", "s390x")
    body, _ = await _get_and_head(client, [("Accept", OCI_MANIFEST), ("User-Agent", s390x)])
    assert body == multi.oci["amd64"]


async def test_conditional_get_of_a_negotiated_child(client: TestClient, multi: MultiPlatform) -> None:
    digest = sha256(multi.oci["amd64"])
    headers = {"Accept": OCI_MANIFEST, "If-None-Match": f'"{digest}"'}
    response = await client.get("/v2/numpy/manifests/latest", headers=headers)
    assert response.status == 304 and response.headers["Docker-Content-Digest"] == digest
    # The index's ETag does not match the child a single-manifest client gets.
    headers["If-None-Match"] = f'"{sha256(multi.index)}"'
    assert (await client.get("/v2/numpy/manifests/latest", headers=headers)).status == 200


async def test_digest_of_an_index_is_served_as_asked(client: TestClient, multi: MultiPlatform) -> None:
    # A digest names one document: no negotiation, as in Distribution.
    response = await client.get(f"/v2/numpy/manifests/{sha256(multi.index)}", headers={"Accept": OCI_MANIFEST})
    assert response.status == 200 and await response.read() == multi.index


async def test_index_without_platform_manifests_is_unknown_to_single_clients(
    client: TestClient, service: InTestService
) -> None:
    # The fixture's index entry has no platform: nothing to choose from.
    service.ref = ImageRef(sha256(service.image.index), OCI_INDEX, sha256(service.image.docker), DOCKER_MANIFEST)
    error = await assert_error(
        await client.get("/v2/numpy/manifests/latest", headers={"Accept": OCI_MANIFEST}), 404, "MANIFEST_UNKNOWN"
    )
    assert "no platform manifest" in error["message"]
    # A client that reads indexes still gets it.
    response = await client.get("/v2/numpy/manifests/latest", headers={"Accept": OCI_INDEX})
    assert response.status == 200 and await response.read() == service.image.index


async def test_head_manifest_builds_like_get(client: TestClient, service: InTestService) -> None:
    response = await client.head("/v2/numpy/manifests/latest", headers={"Accept": OCI_MANIFEST})
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["Content-Length"] == str(len(service.image.oci))
    assert response.headers["Docker-Content-Digest"] == sha256(service.image.oci)
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert len(service.resolved) == 1 and service.finished == 1


async def test_snapshot_tag(client: TestClient, service: InTestService) -> None:
    response = await client.get("/v2/numpy.ge.1.20/manifests/2024-06-01")
    assert response.status == 200
    [(request, reference)] = service.resolved
    assert isinstance(reference, Snapshot) and reference.day.isoformat() == "2024-06-01"
    assert request.specs == ("numpy >=1.20",)


async def test_manifest_by_digest(client: TestClient, service: InTestService) -> None:
    for blob, media_type in (
        (service.image.oci, OCI_MANIFEST),
        (service.image.docker, DOCKER_MANIFEST),
        (service.image.index, OCI_INDEX),
    ):
        digest = sha256(blob)
        # The digest decides, not Accept.
        response = await client.get(f"/v2/numpy/manifests/{digest}", headers={"Accept": DOCKER_MANIFEST})
        assert response.status == 200
        assert await response.read() == blob
        assert response.headers["Content-Type"] == media_type
        assert response.headers["Docker-Content-Digest"] == digest
        head = await client.head(f"/v2/numpy/manifests/{digest}")
        assert head.status == 200 and head.headers["Content-Length"] == str(len(blob))
    assert service.resolved == []
    await assert_error(await client.get(f"/v2/numpy/manifests/{UNKNOWN_DIGEST}"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_known_to_service_but_missing_from_store(
    client: TestClient, service: InTestService, tmp_path: Path
) -> None:
    (tmp_path / "store" / "blobs" / "sha256" / sha256(service.image.docker)[7:]).unlink()
    response = await client.get(f"/v2/numpy/manifests/{sha256(service.image.docker)}")
    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_if_none_match(client: TestClient, service: InTestService) -> None:
    digest = sha256(service.image.oci)
    response = await client.get("/v2/numpy/manifests/latest", headers={"If-None-Match": f'"{digest}"'})
    assert response.status == 304
    assert response.headers["Docker-Content-Digest"] == digest
    response = await client.get("/v2/numpy/manifests/latest", headers={"If-None-Match": '"sha256:other"'})
    assert response.status == 200


async def test_invalid_tag_is_manifest_unknown_without_solving(client: TestClient, service: InTestService) -> None:
    for ref in ("v1.0", "2024-02-30", "2999-01-01", "sha256:abc", "Latest"):
        error = await assert_error(await client.get(f"/v2/numpy/manifests/{ref}"), 404, "MANIFEST_UNKNOWN")
        assert error["message"]
    assert (await client.head("/v2/numpy/manifests/nope")).status == 404
    assert service.resolved == []


async def test_invalid_name(client: TestClient, service: InTestService) -> None:
    for path in ("/v2/NumPy/manifests/latest", "/v2/numpy.ge/manifests/latest", "/v2/a..b/tags/list"):
        error = await assert_error(await client.get(path), 400, "NAME_INVALID")
        assert "numpy.ge.1.20.lt.2" in error["message"]
    too_long = "/".join(["numpy"] * 60)
    await assert_error(await client.get(f"/v2/{too_long}/manifests/latest"), 400, "NAME_INVALID")
    await assert_error(await client.get(f"/v2/Bad/blobs/{UNKNOWN_DIGEST}"), 400, "NAME_INVALID")
    assert service.resolved == []


async def test_unsolvable_is_manifest_unknown_with_the_explanation(client: TestClient) -> None:
    error = await assert_error(
        await client.get("/v2/numpy/nothing-provides-this/manifests/latest"), 404, "MANIFEST_UNKNOWN"
    )
    assert "nothing provides nothing-provides-this" in error["message"]


async def test_service_registry_errors_pass_through(client: TestClient, service: InTestService) -> None:
    service.failure = TooManyRequests("too many builds in progress, retry later")
    error = await assert_error(await client.get("/v2/numpy/manifests/latest"), 429, "TOOMANYREQUESTS")
    assert error["message"] == "too many builds in progress, retry later"
    service.failure = RegistryError("denied by policy", code="DENIED", status=403)
    await assert_error(await client.get("/v2/numpy/manifests/latest"), 403, "DENIED")


async def test_unexpected_failure_is_500_without_traceback(
    client: TestClient, service: InTestService, caplog: pytest.LogCaptureFixture
) -> None:
    service.failure = RuntimeError("secret internal detail at /root/somewhere")
    with caplog.at_level(logging.ERROR, logger="condery.access"):
        response = await client.get("/v2/numpy/manifests/latest")
        error = await assert_error(response, 500, "UNKNOWN")
    assert "secret" not in json.dumps(error)
    # The traceback goes to the log instead, on the request's own line (one line per event).
    (line,) = [record for record in caplog.records if record.name == "condery.access"]
    assert line.levelname == "ERROR" and line.condery_fields["status"] == 500
    assert line.exc_info and "secret internal detail" in str(line.exc_info[1])


async def test_storage_failure_is_503_naming_the_cause(client: TestClient, service: InTestService) -> None:
    # StorageError messages are path-free by contract (condery/storage): the cause is shown.
    service.failure = StorageError("cannot store blob sha256:ab: no space left on device")
    response = await client.get("/v2/numpy/manifests/latest")
    assert response.headers["Retry-After"].isdigit()
    error = await assert_error(response, 503, "UNAVAILABLE")
    assert "no space left on device" in error["message"]


async def test_passing_faults_are_logged(client: TestClient, service: InTestService,
                                         caplog: pytest.LogCaptureFixture) -> None:
    service.failure = Unavailable("cannot solve numpy: cannot read the channels: timed out")
    with caplog.at_level(logging.WARNING, logger="condery.access"):
        await assert_error(await client.get("/v2/numpy/manifests/latest"), 503, "UNAVAILABLE")
    # One line for the event: the request's own, with the error's code and reason.
    (line,) = [getattr(r, FIELDS) for r in caplog.records if r.name == "condery.access"]
    assert line["status"] == 503 and line["error"] == "UNAVAILABLE" and "timed out" in line["reason"]


async def test_client_hangup_withdraws_its_wait(client: TestClient, service: InTestService) -> None:
    # The handler cancels its resolve call once the client has gone; whether the build
    # itself goes on is the service's decision (tests/test_build.py).
    service.gate = asyncio.Event()
    pull = asyncio.create_task(client.get("/v2/numpy/manifests/latest"))
    await asyncio.wait_for(service.entered.wait(), 10)  # the build is waited for
    pull.cancel()  # the client hangs up: aiohttp closes its connection
    with pytest.raises(asyncio.CancelledError):
        await pull
    assert len(service.resolved) == 1 and service.finished == 0
    # The server looks for hung-up clients every HANG_UP_POLL (0.5 s).
    await asyncio.wait_for(service.left.wait(), 10)
    assert service.withdrawn == 1 and service.finished == 0
    assert service.clients == ["127.0.0.1"]  # the peer address, for per-client build limits


async def test_name_with_route_words(client: TestClient, service: InTestService) -> None:
    # Names are split on the last /manifests/, so packages called manifests or blobs work.
    response = await client.get("/v2/manifests/blobs/manifests/latest")
    assert response.status == 200
    assert service.resolved[0][0].canonical_name == "blobs/manifests"


# -- blobs ---------------------------------------------------------------------------


async def test_blob_get_streams_whole_blob(client: TestClient, service: InTestService) -> None:
    layer = service.image.layer
    response = await client.get(f"/v2/scipy/numpy/blobs/{sha256(layer)}")
    assert response.status == 200
    body = await response.read()
    assert sha256(body) == sha256(layer)
    assert response.headers["Content-Length"] == str(len(layer))
    assert response.headers["Docker-Content-Digest"] == sha256(layer)
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_blob_head(client: TestClient, service: InTestService) -> None:
    config = service.image.config
    response = await client.head(f"/v2/numpy/blobs/{sha256(config)}")
    assert response.status == 200
    assert await response.read() == b""
    assert response.headers["Content-Length"] == str(len(config))
    assert response.headers["Docker-Content-Digest"] == sha256(config)
    response = await client.head(f"/v2/numpy/blobs/{UNKNOWN_DIGEST}")
    assert response.status == 404


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, None),
        ("bytes=-100", -100, None),
        ("bytes=1048570-1048590", 1048570, 1048590),  # across the store's chunk boundary
        ("bytes=5-999999999", 5, None),  # the end is clamped
        ("bytes=-999999999", 0, None),  # a suffix longer than the blob is the whole blob
    ],
)
async def test_blob_ranges(
    client: TestClient, service: InTestService, header: str, first: int, last: int | None
) -> None:
    layer = service.image.layer
    expected = layer[first : None if last is None else last + 1]
    response = await client.get(f"/v2/numpy/blobs/{sha256(layer)}", headers={"Range": header})
    assert response.status == 206
    assert await response.read() == expected
    start = first if first >= 0 else len(layer) + first
    assert response.headers["Content-Range"] == f"bytes {start}-{start + len(expected) - 1}/{len(layer)}"
    assert response.headers["Content-Length"] == str(len(expected))


@pytest.mark.parametrize("header", ["bytes=99999999-", "bytes=-0", "bytes=10-5"])
async def test_unsatisfiable_range(client: TestClient, service: InTestService, header: str) -> None:
    layer = service.image.layer
    response = await client.get(f"/v2/numpy/blobs/{sha256(layer)}", headers={"Range": header})
    await assert_error(response, 416, "RANGE_INVALID")
    assert response.headers["Content-Range"] == f"bytes */{len(layer)}"


@pytest.mark.parametrize("header", ["items=0-5", "bytes=0-1,5-6", "bytes=abc", "bytes=-"])
async def test_ignored_range_headers_serve_the_whole_blob(
    client: TestClient, service: InTestService, header: str
) -> None:
    config = service.image.config
    response = await client.get(f"/v2/numpy/blobs/{sha256(config)}", headers={"Range": header})
    assert response.status == 200
    assert await response.read() == config


def test_parse_range_edges() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=9-", 10) == (9, 9)
    assert parse_range("bytes=-1", 10) == (9, 9)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=10-", 10)


LONG = "9" * 5000  # int() refuses more than 4,300 digits: this was a 500


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (f"bytes={LONG}-", 416),  # starts past any end
        (f"bytes={LONG}-{LONG[:3000]}", 416),  # (a header field holds at most 8,190 bytes)
        (f"bytes=0-{LONG}", 206),  # the end is clamped: the whole blob
        (f"bytes=-{LONG}", 206),  # a suffix longer than the blob: the whole blob
        (f"bytes=0000{'0' * 5000}1-", 206),  # leading zeros are still position 1
        ("bytes=\u0661-\u0663", 200),  # Arabic-Indic digits are not a range: ignored
        ("bytes=-5-6", 200),
        ("bytes=0-1,2-3", 200),
    ],
    ids=["long-first", "long-both", "long-last", "long-suffix", "zeros", "unicode-digits", "negative", "multi"],
)
async def test_odd_range_headers_are_never_a_500(
    client: TestClient, service: InTestService, header: str, status: int
) -> None:
    config = service.image.config
    response = await client.get(f"/v2/numpy/blobs/{sha256(config)}", headers={"Range": header})
    if status == 416:
        error = await assert_error(response, 416, "RANGE_INVALID")
        assert len(error["message"]) < 200  # the header is quoted, not echoed whole
        return
    assert response.status == status
    body = await response.read()
    assert body == (config[1:] if "00001-" in header else config)


@settings(max_examples=400, deadline=None)
@given(
    header=st.one_of(
        st.none(),
        st.text(max_size=60),
        st.builds(
            lambda unit, first, last: f"{unit}={first}-{last}",
            st.sampled_from(["bytes", "BYTES", "bytes ", "items"]),
            st.from_regex(r"[0-9]{0,30}", fullmatch=True) | st.text(max_size=5),
            st.from_regex(r"[0-9]{0,30}", fullmatch=True) | st.text(max_size=5),
        ),
    ),
    size=st.integers(min_value=0, max_value=2**62),
)
def test_parse_range_never_raises_and_stays_in_bounds(header: str | None, size: int) -> None:
    try:
        byte_range = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if byte_range is not None:
        first, last = byte_range
        assert 0 <= first <= last < size


async def test_blob_errors(client: TestClient) -> None:
    for bad in ("sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "latest"):
        await assert_error(await client.get(f"/v2/numpy/blobs/{bad}"), 400, "DIGEST_INVALID")
    await assert_error(await client.get(f"/v2/numpy/blobs/{UNKNOWN_DIGEST}"), 404, "BLOB_UNKNOWN")


async def test_blob_redirect(aiohttp_client: Any, service: InTestService, tmp_path: Path) -> None:
    class RedirectingStore(FilesystemStore):
        """A filesystem store that also has a direct URL for each blob, as S3 does."""

        async def blob_redirect_url(self, digest: str) -> str | None:
            return f"http://blobs.example.invalid/{digest}?signature=x"

    store = RedirectingStore(tmp_path / "store")
    client = await aiohttp_client(create_app(service, store))
    digest = sha256(service.image.layer)
    response = await client.get(f"/v2/numpy/blobs/{digest}", allow_redirects=False)
    assert response.status == 307
    assert response.headers["Location"] == f"http://blobs.example.invalid/{digest}?signature=x"
    # An unknown blob is still BLOB_UNKNOWN, not a redirect to nothing.
    await assert_error(
        await client.get(f"/v2/numpy/blobs/{UNKNOWN_DIGEST}", allow_redirects=False), 404, "BLOB_UNKNOWN"
    )


# -- tags ----------------------------------------------------------------------------


async def test_tags_list_and_pagination(client: TestClient, service: InTestService) -> None:
    tags = ["latest", "2024-06-01", "2024-05-01", "2023-01-01", "2024-06-01"]
    service.known_tags["numpy/scipy"] = tags
    response = await client.get("/v2/scipy/numpy/tags/list")
    assert response.status == 200
    assert await response.json() == {"name": "scipy/numpy", "tags": sorted(set(tags))}
    assert "Link" not in response.headers

    seen: list[str] = []
    url = "/v2/scipy/numpy/tags/list?n=2"
    pages = 0
    while url:
        response = await client.get(url)
        assert response.status == 200
        page = (await response.json())["tags"]
        assert len(page) <= 2
        seen += page
        pages += 1
        link = response.headers.get("Link")
        if link:
            assert link.endswith('>; rel="next"')
            url = link[1 : link.index(">")]
            assert url.startswith("/v2/scipy/numpy/tags/list?n=2&last=")
        else:
            url = ""
    assert seen == sorted(set(tags)) and pages == 2

    response = await client.get("/v2/scipy/numpy/tags/list?last=2024-05-01")
    assert (await response.json())["tags"] == ["2024-06-01", "latest"]
    response = await client.get("/v2/scipy/numpy/tags/list?n=0")
    assert (await response.json())["tags"] == []


async def test_tags_list_unknown_name_is_empty(client: TestClient) -> None:
    response = await client.get("/v2/pandas/tags/list")
    assert response.status == 200
    assert await response.json() == {"name": "pandas", "tags": []}


async def test_tags_list_bad_n(client: TestClient) -> None:
    for n in ("-1", "abc", "1.5", ""):
        await assert_error(await client.get(f"/v2/numpy/tags/list?n={n}"), 400, "PAGINATION_NUMBER_INVALID")


# -- referrers -----------------------------------------------------------------------


async def test_referrers_is_an_empty_index(client: TestClient, service: InTestService) -> None:
    response = await client.get(f"/v2/numpy/referrers/{sha256(service.image.oci)}")
    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert await response.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    await assert_error(await client.get("/v2/numpy/referrers/sha256:nope"), 400, "DIGEST_INVALID")


# -- push ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/numpy/blobs/uploads/"),
        ("POST", f"/v2/numpy/blobs/uploads/?digest={UNKNOWN_DIGEST}"),
        ("GET", "/v2/numpy/blobs/uploads/some-upload-id"),
        ("PATCH", "/v2/numpy/blobs/uploads/some-upload-id"),
        ("PUT", f"/v2/numpy/blobs/uploads/some-upload-id?digest={UNKNOWN_DIGEST}"),
        ("DELETE", "/v2/numpy/blobs/uploads/some-upload-id"),
        ("PUT", "/v2/numpy/manifests/latest"),
        ("DELETE", "/v2/numpy/manifests/latest"),
        ("DELETE", f"/v2/numpy/blobs/{UNKNOWN_DIGEST}"),
        ("PUT", "/v2/numpy/tags/list"),
    ],
)
async def test_push_is_unsupported(client: TestClient, service: InTestService, method: str, path: str) -> None:
    await assert_error(await client.request(method, path, data=b"{}"), 405, "UNSUPPORTED")
    assert service.resolved == []


# -- connections: the real listener `condery serve` runs (condery/registry/connections.py) --


@contextlib.asynccontextmanager
async def listening(service: InTestService, store: FilesystemStore, **limits: Any) -> AsyncIterator[int]:
    """The app behind `serving()` on a free loopback port, as `condery serve` runs it."""
    settings = {"max_connections": 100, "max_connections_per_client": 100, "header_timeout": 5, "idle_timeout": 5}
    settings.update(limits)
    async with serving(
        create_app(service, store), "127.0.0.1", 0, ConnectionLimits(**settings), access_log_format="%r %s"
    ) as site:
        yield site.port


@dataclass
class RawAnswer:
    status: int | None  # None: closed without an answer
    headers: dict[str, str]
    body: bytes
    seconds: float


async def exchange(port: int, data: bytes, *, wait: float = 10.0, source: str = "127.0.0.1") -> RawAnswer:
    """Send raw bytes, read until the server closes the connection (or `wait` passes).

    `source`: the local address to connect from; all of 127.0.0.0/8 is loopback, so
    127.0.0.2 is another client as far as the server can tell.
    """
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        raw = b""
        with contextlib.suppress(ConnectionError):
            raw = await asyncio.wait_for(reader.read(), wait)
    finally:
        writer.close()
    seconds = time.monotonic() - started
    if not raw:
        return RawAnswer(None, {}, b"", seconds)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return RawAnswer(int(status_line.split()[1]), headers, body, seconds)


async def hold(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection the server has accepted: one request on it was answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    await reader.readexactly(2)  # the body: {}
    return reader, writer


async def release(held: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Close a held connection and return once the server has let it go.

    The server closes after answering `Connection: close`; asyncio runs the protocol's
    connection_lost (which frees the slot) before it closes the socket, so the EOF read
    here comes after the slot is free.
    """
    reader, writer = held
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await asyncio.wait_for(reader.read(), 10)
    writer.close()


def oci_error(answer: RawAnswer, status: int, code: str) -> str:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["docker-distribution-api-version"] == "registry/2.0"
    errors = json.loads(answer.body)["errors"]
    assert [e["code"] for e in errors] == [code] and set(errors[0]) == {"code", "message", "detail"}
    return errors[0]["message"]


async def test_oversized_and_malformed_headers_are_oci_4xx(
    service: InTestService, store: FilesystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    get = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n"
    cases = [
        (get + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),  # a header past max_field_size
        (get + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n", 431),  # past max_headers
        (b"GET /v2/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),  # request line too long
        (get + b"Range: bytes=" + b"9" * 9000 + b"-\r\n\r\n", 431),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to the HTTP port
        (get + b"Bad Header\r\n\r\n", 400),
        (get + b"Content-Length: -1\r\n\r\n", 400),
    ]
    with caplog.at_level(logging.INFO):
        async with listening(service, store) as port:
            for data, status in cases:
                message = oci_error(await exchange(port, data), status, "UNKNOWN")
                assert "aaaa" not in message and "9999" not in message  # the input is not echoed
            # The listener still answers normal requests.
            answer = await exchange(port, get + b"Connection: close\r\n\r\n")
            assert answer.status == 200 and answer.body == b"{}"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_slow_headers_get_408_and_idle_connections_close(service: InTestService, store: FilesystemStore) -> None:
    async with listening(service, store, header_timeout=1, idle_timeout=1) as port:
        # Nothing sent at all, and headers trickled without their final empty line.
        silent, partial = await asyncio.gather(
            exchange(port, b""), exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        )
        for answer in (silent, partial):
            assert 0.9 < answer.seconds < 3, answer
            oci_error(answer, 408, "UNKNOWN")

        # A keep-alive connection is closed once idle for idle_timeout, without a 408.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 2" in head
        assert await reader.readexactly(2) == b"{}"
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.5 < time.monotonic() - started < 3
        writer.close()


async def test_trickling_client_is_cut_at_header_timeout(service: InTestService, store: FilesystemStore) -> None:
    """One byte every 50 ms keeps aiohttp's idle timer happy; the header deadline does not move."""
    async with listening(service, store, header_timeout=1, idle_timeout=30) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def trickle() -> None:
            for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:  # would take 12 s
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        started = time.monotonic()
        sender = asyncio.create_task(trickle())
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            sender.cancel()
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 2


async def test_connections_past_the_limit_get_503_and_are_closed(
    service: InTestService, store: FilesystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="condery.connections"):
        async with listening(service, store, max_connections=3, header_timeout=30) as port:
            held = [await hold(port) for _ in range(3)]
            refused = await asyncio.gather(*(exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(20)))
            for answer in refused:
                if answer.status is not None:  # (or reset before the answer could be read)
                    oci_error(answer, 503, "UNAVAILABLE")
                    assert answer.headers["retry-after"] == "1"
                assert answer.seconds < 2
            assert any(answer.status == 503 for answer in refused)
            # A held connection that closes frees its slot.
            await release(held[0])
            answer = await exchange(port, b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert answer.status == 200
            for _, writer in held[1:]:
                writer.close()
    refusals = [r for r in caplog.records if "connections refused" in r.getMessage()]
    assert len(refusals) == 1 and not refusals[0].exc_info  # one line, not one per connection


async def test_one_client_cannot_take_every_connection(
    service: InTestService, store: FilesystemStore, caplog: pytest.LogCaptureFixture
) -> None:
    request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with caplog.at_level(logging.WARNING, logger="condery.connections"):
        async with listening(service, store, max_connections=10, max_connections_per_client=3, header_timeout=30) as port:
            held = [await hold(port) for _ in range(3)]
            answers = await asyncio.gather(*(exchange(port, request) for _ in range(5)))
            assert {answer.status for answer in answers} <= {503, None} and 503 in {a.status for a in answers}
            # Another address still gets in while the first one holds its share.
            assert (await exchange(port, request, source="127.0.0.2")).status == 200
            for connection in held:
                await release(connection)
            assert (await exchange(port, request)).status == 200  # released
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "max_connections_per_client=3" in lines[0] and "127.0.0.1" in lines[0], lines


def test_throttled_logs_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    throttled = Throttled("things refused", interval=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="condery.connections"):
        for _ in range(1000):
            throttled.event()
        now[0] += 10
        throttled.event()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "things refused: 1 since the last report (1 in all)",
        "things refused: 1000 since the last report (1001 in all)",
    ]


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    """In a child process whose soft limit is lowered first, as a service manager may."""

    def lower() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, min(hard, 4096)))

    code = (
        "import resource; from condery.registry.connections import raise_open_file_limit as r; "
        "print(r(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=lower, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    ).stdout.split()
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096)
    assert [int(v) for v in out] == [hard, hard, hard]


def test_default_max_connections_leaves_room_for_files() -> None:
    assert default_max_connections(1024) == 512
    assert default_max_connections(20000) == 4096
    assert default_max_connections(10) == 16
    assert default_max_connections_per_client(4096) == 512
    assert default_max_connections_per_client(50) == 8
    assert default_max_connections_per_client(5) == 5


def test_connection_settings_are_validated() -> None:
    config = load_config(environ={"CONDERY_HEADER_TIMEOUT": "3", "CONDERY_MAX_CONNECTIONS": "50"})
    assert (config.header_timeout, config.idle_timeout, config.max_connections) == (3, 30, 50)
    for key in ("CONDERY_HEADER_TIMEOUT", "CONDERY_IDLE_TIMEOUT"):
        with pytest.raises(ConfigError, match="at least 1 second"):
            load_config(environ={key: "0"})


async def test_throttled_reports_the_rest_of_a_burst_later(caplog: pytest.LogCaptureFixture) -> None:
    throttled = Throttled("things refused", interval=0.3)
    with caplog.at_level(logging.WARNING, logger="condery.connections"):
        for _ in range(500):
            throttled.event(", the last from 127.0.0.1")
        await asyncio.sleep(0.5)  # the burst has stopped: its count arrives anyway
    assert [r.getMessage() for r in caplog.records] == [
        "things refused: 1 since the last report (1 in all), the last from 127.0.0.1",
        "things refused: 499 since the last report (500 in all), the last from 127.0.0.1",
    ]
