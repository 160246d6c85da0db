"""End to end: two `condery serve` replicas on one S3 bucket (real SeaweedFS) with a real
redis-server between them: one build of a cold name asked at both, a killed builder
replaced after its lease, and pulls going on when Redis is gone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.gated_channel import GatedChannel, gated_channel
from tests.fixtures.procs import running
from tests.fixtures.redis_server import RedisServer, redis  # noqa: F401 - the fixture
from tests.test_e2e import Registry, serve
from tests.test_e2e_builds import in_background, pull_manifest, wait_for
from tests.test_e2e_observability import samples

pytestmark = pytest.mark.e2e

LEASE = 3  # seconds


@dataclass
class Replica:
    registry: Registry
    proc: subprocess.Popen[bytes]
    log: Path

    def builds(self) -> float:
        return samples(self.registry).get(("condery_builds_total", (("result", "ok"),)), 0.0)

    def lock_events(self, event: str) -> float:
        return samples(self.registry).get(("condery_build_locks_total", (("event", event),)), 0.0)


@pytest.fixture
def gated(fixture_channel: Path) -> Iterator[GatedChannel]:
    with gated_channel(fixture_channel) as channel:
        yield channel


@contextlib.contextmanager
def replicas(tmp: Path, channel: str, base_layout: Path, seaweed, redis_url: str) -> Iterator[list[Replica]]:
    """Two replicas, each with its own package cache and work directory, on one new bucket."""
    storage = {"backend": "s3", "bucket": seaweed.create_bucket(), "endpoint_url": seaweed.endpoint_url,
               "region": "us-east-1"}
    coordination = {"backend": "redis", "url": redis_url, "lease": LEASE}
    with contextlib.ExitStack() as stack:
        started = []
        for name in ("a", "b"):
            (tmp / name).mkdir()
            argv, store, port = serve(tmp / name, [channel], f"oci:{base_layout}:bookworm",
                                      storage=storage, coordination=coordination)
            url = f"http://127.0.0.1:{port}"
            log = tmp / name / "condery.log"
            proc = stack.enter_context(running(argv, url=url + "/v2/", env=seaweed.env, log_path=log, timeout=60))
            started.append(Replica(Registry(url, f"127.0.0.1:{port}", store), proc, log))
        yield started


def test_one_cold_name_asked_at_both_replicas_builds_once(
    tmp_path: Path, base_layout: Path, gated: GatedChannel, seaweed, redis: RedisServer
) -> None:
    with replicas(tmp_path, gated.url, base_layout, seaweed, redis.url) as (a, b):
        pulls = [in_background(a.registry, "xz"), in_background(b.registry, "xz")]
        wait_for(lambda: gated.package_requests("xz") >= 1)  # one of them builds, held at the gate
        wait_for(lambda: a.lock_events("waited") + b.lock_events("waited") >= 1)  # the other waits for it
        gated.packages.set()
        for thread, _ in pulls:
            thread.join(60)
        (status_a, headers_a, _), (status_b, headers_b, _) = pulls[0][1][0], pulls[1][1][0]
        assert (status_a, status_b) == (200, 200)
        assert headers_a["Docker-Content-Digest"] == headers_b["Docker-Content-Digest"]
        assert a.builds() + b.builds() == 1
        assert gated.package_requests("xz") == 1  # downloaded by one replica only


def test_a_killed_builder_is_replaced_after_its_lease(
    tmp_path: Path, base_layout: Path, gated: GatedChannel, seaweed, redis: RedisServer
) -> None:
    with replicas(tmp_path, gated.url, base_layout, seaweed, redis.url) as (a, b):
        # Answered by nobody: its replica is killed (the connection drops).
        threading.Thread(target=pull_dropped, args=(a.registry, "xz"), daemon=True).start()
        wait_for(lambda: gated.package_requests("xz") >= 1)  # a holds the lock, building
        thread, result = in_background(b.registry, "xz")
        wait_for(lambda: b.lock_events("waited") >= 1)
        os.kill(a.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        a.proc.wait(10)
        gated.packages.set()
        thread.join(60)
        took = time.monotonic() - killed
        print(f"pull at the surviving replica answered {took:.1f} s after the builder was killed (lease {LEASE} s)")
        status, headers, manifest = result[0]
        assert status == 200 and manifest["layers"]
        assert b.builds() == 1
        # Not before the dead holder's lease ran out (renewed every lease/3), not much after.
        assert LEASE / 2 < took < LEASE + 30, took


def pull_dropped(registry: Registry, name: str) -> None:
    with contextlib.suppress(OSError):  # the connection drops when its replica is killed
        pull_manifest(registry, name)


def test_replicas_serve_and_build_with_redis_stopped(
    tmp_path: Path, base_layout: Path, fixture_channel: Path, seaweed, redis: RedisServer
) -> None:
    with replicas(tmp_path, str(fixture_channel), base_layout, seaweed, redis.url) as (a, b):
        redis.stop()
        started = time.monotonic()
        for replica, name in ((a, "xz"), (b, "xz"), (b, "tzdata"), (a, "tzdata")):
            status, _, body = replica.registry.get(f"/v2/{name}/manifests/latest")
            assert status == 200, body
        assert time.monotonic() - started < 60
        assert a.lock_events("unavailable") >= 1 and b.lock_events("unavailable") >= 1
        for replica in (a, b):
            warnings = replica.log.read_text().count("Redis unavailable")
            assert warnings == 1, replica.log.read_text()[-3000:]  # once per interval, not per request


def test_an_environment_pushed_to_one_replica_pulls_from_the_other(
    tmp_path: Path, base_layout: Path, fixture_channel: Path, seaweed, redis: RedisServer
) -> None:
    from tests.test_e2e_environments import environment_file, post

    with replicas(tmp_path, str(fixture_channel), base_layout, seaweed, redis.url) as (a, b):
        status, answer = post(a.registry, environment_file(fixture_channel.name).encode())
        assert status == 201, answer
        status, headers, body = b.registry.get(f"/v2/{answer['name']}/manifests/latest")  # from the bucket
        assert status == 200, body
        assert a.registry.get(f"/v2/{answer['name']}/manifests/latest")[1]["Docker-Content-Digest"] \
            == headers["Docker-Content-Digest"]
        assert a.builds() == 0 and b.builds() == 1
