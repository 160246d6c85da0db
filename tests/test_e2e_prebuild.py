"""End to end: prebuilds and build progress through a real `condery serve` process.

The registry reads the fixture channel over HTTP through a gate (tests/fixtures/
gated_channel.py): package downloads wait until the test opens it, so a build can be
watched while it is under way, deterministically. Clients are plain HTTP connections.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path

import pytest

from tests.fixtures.gated_channel import GatedChannel, gated_channel
from tests.test_e2e import OCI_MANIFEST, Registry, condery
from tests.test_e2e_builds import in_background, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def gated(fixture_channel: Path):
    with gated_channel(fixture_channel) as channel:
        yield channel


def api(registry: Registry, method: str, path: str, body: object = None) -> tuple[int, dict, dict]:
    host, port = registry.host.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), json.loads(answer.read())
    finally:
        connection.close()


def prebuild(registry: Registry, name: str, tag: str = "latest") -> tuple[int, dict, dict]:
    return api(registry, "POST", "/api/v1/builds", {"name": name, "tag": tag})


def build_state(registry: Registry, location: str) -> dict:
    status, _, body = api(registry, "GET", location)
    assert status == 200, body
    return body


def pulled_digest(registry: Registry, name: str) -> str:
    status, headers, body = registry.get(f"/v2/{name}/manifests/latest", accept=(OCI_MANIFEST,))
    assert status == 200, body
    return headers["Docker-Content-Digest"]


def test_a_prebuild_followed_to_done(tmp_path: Path, base_layout: Path, gated: GatedChannel) -> None:
    with condery(tmp_path, [gated.url], f"oci:{base_layout}:bookworm") as registry:
        # xz's layer in the cache first, so that the prebuild below reuses it at once and
        # its progress stands part-way while condery-hello's download is held.
        gated.packages.set()
        pulled_digest(registry, "xz")
        gated.packages.clear()

        status, headers, first = prebuild(registry, "xz/condery-hello")
        assert status == 202, first
        location = headers["Location"]
        assert location == f"/api/v1/builds/{first['id']}"
        assert first["name"] == "condery-hello/xz" and first["tag"] == "latest"  # canonical
        assert first["state"] in ("queued", "solving", "building")
        assert first["digest"] is None and first["error"] is None and first["finished_at"] is None

        wait_for(lambda: gated.package_requests("condery-hello") >= 1)
        wait_for(lambda: build_state(registry, location)["progress"]["packages_done"] >= 1)
        held = build_state(registry, location)
        progress = held["progress"]
        assert held["state"] == "building"
        assert 0 < progress["packages_done"] < progress["packages_total"]
        assert 0 < progress["bytes_done"] < progress["bytes_total"]
        # Asking again joins: the same id, no second build.
        again_status, again_headers, again = prebuild(registry, "condery-hello/xz")
        assert again_status == 202 and again["id"] == first["id"] and again_headers["Location"] == location
        status, _, listing = api(registry, "GET", "/api/v1/builds")
        assert status == 200
        assert [b["id"] for b in listing["builds"] if b["state"] not in ("done", "failed")] == [first["id"]]

        gated.packages.set()
        wait_for(lambda: build_state(registry, location)["state"] == "done")
        done = build_state(registry, location)
        progress = done["progress"]
        assert progress["packages_done"] == progress["packages_total"]
        assert progress["bytes_done"] == progress["bytes_total"] > 0
        assert done["error"] is None and done["finished_at"] >= done["started_at"]
        assert done["digest"] == pulled_digest(registry, "xz/condery-hello")
        assert gated.package_requests("condery-hello") == 1

        # Built: a prebuild answers 200 at once with the digest, and nothing to follow.
        status, headers, built = prebuild(registry, "xz/condery-hello")
        assert status == 200 and built["state"] == "done" and built["digest"] == done["digest"]
        assert "Location" not in headers


def test_a_failing_name_reaches_failed_with_the_solvers_reason(
    tmp_path: Path, base_layout: Path, gated: GatedChannel
) -> None:
    gated.packages.set()
    with condery(tmp_path, [gated.url], f"oci:{base_layout}:bookworm") as registry:
        status, headers, started = prebuild(registry, "condery-hello.gt.99")
        assert status == 202, started
        wait_for(lambda: build_state(registry, headers["Location"])["state"] == "failed")
        failed = build_state(registry, headers["Location"])
        assert failed["error"]["code"] == "MANIFEST_UNKNOWN"
        assert "cannot solve condery-hello" in failed["error"]["message"]
        assert failed["digest"] is None and failed["finished_at"] is not None
        # The pull gives the same reason, remembered: no second solve.
        status, code, message = registry.error_code("/v2/condery-hello.gt.99/manifests/latest")
        assert (status, code, message) == (404, "MANIFEST_UNKNOWN", failed["error"]["message"])
        status, _, listing = api(registry, "GET", "/api/v1/builds")
        assert [b["state"] for b in listing["builds"] if b["id"] == failed["id"]] == ["failed"]


def test_a_pull_joins_a_prebuild(tmp_path: Path, base_layout: Path, gated: GatedChannel) -> None:
    # One build slot and no queue: a pull that started a build of its own would get 429.
    with condery(
        tmp_path, [gated.url], f"oci:{base_layout}:bookworm", max_concurrent_builds=1, max_queued_builds=0,
    ) as registry:
        status, headers, started = prebuild(registry, "condery-symlinks")
        assert status == 202, started
        wait_for(lambda: gated.package_requests("condery-symlinks") >= 1)
        assert prebuild(registry, "zlib")[0] == 429  # the slot is taken: a prebuild is admitted like a pull
        pull, result = in_background(registry, "condery-symlinks")
        threading.Event().wait(1.0)  # the pull has arrived and waits: the build is still held
        assert not result
        gated.packages.set()
        pull.join(120)
        status, answer_headers, manifest = result[0]
        assert status == 200, manifest
        done = build_state(registry, headers["Location"])
        assert done["state"] == "done" and done["digest"] == answer_headers["Docker-Content-Digest"]
        assert gated.package_requests("condery-symlinks") == 1  # one build


def test_a_client_that_gives_up_and_retries_joins_the_build_in_flight(
    tmp_path: Path, base_layout: Path, gated: GatedChannel
) -> None:
    with condery(tmp_path, [gated.url], f"oci:{base_layout}:bookworm") as registry:
        host, port = registry.host.split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET /v2/condery-hello/manifests/latest HTTP/1.1\r\nHost: {registry.host}\r\n\r\n".encode())
            wait_for(lambda: gated.package_requests("condery-hello") >= 1)
        # Gone (the server notices within HANG_UP_POLL): the build started goes on, and
        # the builds API shows it.
        wait_for(lambda: any(b["name"] == "condery-hello" and b["state"] == "building"
                             for b in api(registry, "GET", "/api/v1/builds")[2]["builds"]))
        retry, result = in_background(registry, "condery-hello")
        threading.Event().wait(1.0)  # the retry has arrived and waits: the build is still held
        assert not result
        gated.packages.set()
        retry.join(120)
        assert result[0][0] == 200, result
        assert gated.package_requests("condery-hello") == 1  # joined: one download, one build
        (build,) = [b for b in api(registry, "GET", "/api/v1/builds")[2]["builds"] if b["name"] == "condery-hello"]
        assert build["state"] == "done"
