"""End to end: builds are a scarce resource, through a real `condery serve` process.

The registry reads the fixture channel over HTTP through a gate (tests/fixtures/
gated_channel.py), so a cold build holds its slot until the test lets its package
download go. Clients are plain HTTP connections from different loopback addresses
(127.0.0.2 is another client than 127.0.0.1 for condery), and a client that hangs up
simply closes its socket.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.gated_channel import GatedChannel, gated_channel
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e


@pytest.fixture
def gated(fixture_channel: Path):
    with gated_channel(fixture_channel) as channel:
        yield channel


def pull_manifest(registry: Registry, name: str, client: str = "127.0.0.1") -> tuple[int, dict, dict]:
    """GET the manifest of NAME:latest from source address `client`: status, headers, JSON."""
    host, port = registry.host.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120, source_address=(client, 0))
    try:
        connection.request("GET", f"/v2/{name}/manifests/latest")
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), json.loads(answer.read())
    finally:
        connection.close()


def in_background(registry: Registry, name: str, client: str = "127.0.0.1") -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(pull_manifest(registry, name, client)), daemon=True)
    thread.start()
    return thread, result


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_full_build_queue_is_429_and_pulls_go_on(tmp_path: Path, base_layout: Path, gated: GatedChannel) -> None:
    with condery(
        tmp_path, [gated.url], f"oci:{base_layout}:bookworm",
        max_concurrent_builds=1, max_queued_builds=1, max_builds_per_client=10,
    ) as registry:
        first, first_result = in_background(registry, "condery-hello")
        wait_for(lambda: gated.package_requests("condery-hello"))  # building, holding the only slot
        names = ["condery-symlinks", "zlib", "condery-empty", "tzdata"]
        others = [in_background(registry, name) for name in names]
        # One of them takes the only place in the queue; the others are refused at once.
        wait_for(lambda: sum(1 for _, result in others if result) == 3)
        refused = [(name, result[0]) for name, (_, result) in zip(names, others) if result]
        for name, (status, headers, body) in refused:
            assert status == 429, (name, body)
            assert body["errors"][0]["code"] == "TOOMANYREQUESTS"
            assert "queue is full" in body["errors"][0]["message"]
            assert int(headers["Retry-After"]) > 0

        gated.packages.set()
        for thread, _ in [(first, first_result), *others]:
            thread.join(120)
        assert first_result[0][0] == 200
        assert sum(1 for _, result in others if result[0][0] == 200) == 1
        # Refused names are not remembered as failures: a retry builds them.
        status, headers, manifest = pull_manifest(registry, refused[0][0])
        assert status == 200 and manifest["layers"]
        status, _, _ = registry.get(f"/v2/{refused[0][0]}/blobs/{manifest['layers'][-1]['digest']}", method="HEAD")
        assert status == 200


def test_per_client_limit_and_hang_up_while_queued(tmp_path: Path, base_layout: Path, gated: GatedChannel) -> None:
    with condery(
        tmp_path, [gated.url], f"oci:{base_layout}:bookworm",
        max_concurrent_builds=1, max_queued_builds=2, max_builds_per_client=1,
    ) as registry:
        first, first_result = in_background(registry, "condery-hello", "127.0.0.1")
        wait_for(lambda: gated.package_requests("condery-hello"))
        status, headers, body = pull_manifest(registry, "condery-symlinks", "127.0.0.1")
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert "this client" in body["errors"][0]["message"]

        def queue_full() -> bool:
            """Whether both places in the queue are taken, asked without taking one: client
            1 is at its limit, so a new name from it is refused either way, and the
            full-queue check comes first."""
            status, _, body = pull_manifest(registry, "condery-empty", "127.0.0.1")
            assert status == 429, body
            return "queue is full" in body["errors"][0]["message"]

        # Another client queues a build, then hangs up before it starts: it is dropped, and
        # its place in the queue goes to others.
        host, port = registry.host.split(":")
        with socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0)) as sock:
            sock.sendall(f"GET /v2/condery-symlinks/manifests/latest HTTP/1.1\r\nHost: {registry.host}\r\n\r\n".encode())
            queued = [in_background(registry, "zlib", "127.0.0.3")]
            wait_for(queue_full)  # condery-symlinks and zlib both wait
        # The server looks for hung-up clients every HANG_UP_POLL (0.5 s).
        wait_for(lambda: not queue_full())
        queued.append(in_background(registry, "tzdata", "127.0.0.4"))
        wait_for(queue_full)  # the freed place is tzdata's
        assert not any(result for _, result in queued), "a place in the queue was still taken"

        gated.packages.set()
        for thread, result in [(first, first_result), *queued]:
            thread.join(120)
            assert result[0][0] == 200, result
        assert gated.package_requests("condery-symlinks") == 0  # never started
        assert not (registry.store / "records" / "images" / "condery-symlinks").exists()
