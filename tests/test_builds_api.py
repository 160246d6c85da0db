"""Build progress tracking (condery/build/progress.py) and the builds API over loopback HTTP.

The API tests run the real ImageService against the fixture channel behind a gate
(tests/fixtures/gated_channel.py), served by aiohttp's test server; the whole path
through a `condery serve` process is in tests/test_e2e_prebuild.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from condery.build.progress import BuildTracker, build_id
from condery.image.names import parse_name
from condery.registry.server import create_app
from condery.image.tags import Latest
from tests.fixtures.gated_channel import GatedChannel
from tests.test_build import counting_builds, gated, make_service, until  # noqa: F401 - fixtures used below


# -- progress tracking --------------------------------------------------------------
def test_a_status_follows_the_pipeline() -> None:
    tracker = BuildTracker()
    status = tracker.start("zlib/_/latest/abc", "zlib", "latest")
    assert status.id == build_id("zlib/_/latest/abc") and len(status.id) == 24
    assert status.to_json()["state"] == "queued"
    status.started()
    assert status.state == "solving"
    status.solving("linux-64")
    status.solved("linux-64", 3, 300)
    status.layer_done("linux-64", "a-1-0.conda", True, 100)
    status.layer_done("linux-64", "b-1-0.conda", False, 50)
    shown = status.to_json()
    assert shown["state"] == "building"
    assert shown["progress"] == {"packages_done": 2, "packages_total": 3, "bytes_done": 150, "bytes_total": 300}
    # A second platform adds to the totals when its solve ends.
    status.solved("linux-aarch64", 2, 200)
    assert status.to_json()["progress"]["bytes_total"] == 500
    status.finished("sha256:" + "0" * 64)
    shown = status.to_json()
    assert shown["state"] == "done" and shown["digest"] == "sha256:" + "0" * 64 and shown["error"] is None
    assert shown["started_at"].endswith("Z") and shown["finished_at"] >= shown["started_at"]
    assert tracker.get(status.id) is status


def test_a_failure_keeps_its_reason() -> None:
    status = BuildTracker().start("k", "zlib.gt.99", "latest")
    status.failed("MANIFEST_UNKNOWN", "cannot solve zlib.gt.99: nothing provides zlib >99")
    assert status.to_json()["error"] == {
        "code": "MANIFEST_UNKNOWN", "message": "cannot solve zlib.gt.99: nothing provides zlib >99",
    }
    assert status.to_json()["state"] == "failed" and status.to_json()["digest"] is None


def test_finished_builds_are_kept_bounded_and_in_flight_ones_always() -> None:
    tracker = BuildTracker(keep_finished=2, keep_seconds=3600)
    running = tracker.start("running", "a", "latest")
    ended = []
    for key in ("one", "two", "three"):
        status = tracker.start(key, key, "latest")
        status.finished("sha256:" + "1" * 64)
        ended.append(status)
    # The oldest finished one went; the one in flight stays; most recent finished first.
    assert [s.id for s in tracker.listing()] == [running.id, ended[2].id, ended[1].id]
    assert tracker.get(ended[0].id) is None

    short = BuildTracker(keep_seconds=0.05)
    gone = short.start("x", "x", "latest")
    gone.failed("UNAVAILABLE", "channel down")
    stays = short.start("y", "y", "latest")
    time.sleep(0.1)
    assert short.get(gone.id) is None and short.get(stays.id) is stays


def test_a_retry_replaces_a_finished_status_and_discard_forgets_only_its_own() -> None:
    tracker = BuildTracker()
    first = tracker.start("k", "zlib", "latest")
    first.failed("UNAVAILABLE", "channel down")
    second = tracker.start("k", "zlib", "latest")
    assert second.id == first.id and tracker.get(first.id) is second and second.state == "queued"
    tracker.discard(first)  # an old status of the same id: not the one tracked
    assert tracker.get(first.id) is second
    tracker.discard(second)
    assert tracker.get(first.id) is None and tracker.listing() == []


# -- the API over HTTP ----------------------------------------------------------------
@pytest.fixture
async def api(aiohttp_client: Any, make_service):  # noqa: F811 - the fixture imported above
    service = await make_service(max_concurrent_builds=1, max_queued_builds=0)
    return service, await aiohttp_client(create_app(service, service.store))


async def error_of(response, status: int, code: str) -> str:
    assert response.status == status, await response.text()
    (error,) = (await response.json())["errors"]
    assert error["code"] == code
    return error["message"]


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "NAME_INVALID"),
        (b"[]", 400, "NAME_INVALID"),
        (b'{"tag": "latest"}', 400, "NAME_INVALID"),
        (b'{"name": "zlib", "tag": 3}', 400, "NAME_INVALID"),
        (b'{"name": "Bad Name!"}', 400, "NAME_INVALID"),
        (b'{"name": "zlib", "tag": "sha256:' + b"0" * 64 + b'"}', 400, "NAME_INVALID"),
        (b'{"name": "zlib", "tag": "nightly"}', 404, "MANIFEST_UNKNOWN"),  # as a pull answers it
        (b"\xff\xfe", 400, "NAME_INVALID"),
        (b"[" * 60_000, 400, "NAME_INVALID"),
    ],
)
async def test_bad_requests_get_a_clear_error(api, body: bytes, status: int, code: str) -> None:
    _, client = api
    message = await error_of(await client.post("/api/v1/builds", data=body), status, code)
    assert "/tmp" not in message


async def test_unknown_ids_and_methods(api) -> None:
    _, client = api
    for path in ("/api/v1/builds/" + "0" * 24, "/api/v1/builds/..%2F..%2Fetc", "/api/v1/builds/" + "x" * 500):
        message = await error_of(await client.get(path), 404, "NAME_UNKNOWN")
        assert len(message) < 200
    await error_of(await client.delete("/api/v1/builds"), 405, "UNSUPPORTED")
    await error_of(await client.post("/api/v1/builds", data=b"x" * 70_000), 400, "NAME_INVALID")


async def test_a_prebuild_is_admitted_like_a_pull(api, gated: GatedChannel) -> None:  # noqa: F811
    service, client = api
    started = await client.post("/api/v1/builds", json={"name": "condery-hello"})
    assert started.status == 202
    body = await started.json()
    assert started.headers["Location"] == f"/api/v1/builds/{body['id']}"
    await until(lambda: gated.package_requests("condery-hello"))  # holds the only slot
    # The queue is full: a prebuild of another name is refused, and leaves no status.
    await error_of(await client.post("/api/v1/builds", json={"name": "zlib"}), 429, "TOOMANYREQUESTS")
    assert [b["name"] for b in (await (await client.get("/api/v1/builds")).json())["builds"]] == ["condery-hello"]
    # A pull of the same name joins (it would be refused if it started a build).
    pull = asyncio.ensure_future(
        service.resolve(parse_name("condery-hello", service.meta_packages), Latest(), "10.0.0.9")
    )
    await until(lambda: service.builds.waiting == 2)
    gated.packages.set()
    ref = await pull
    await until(lambda: service.outcomes.builds.get(body["id"]).state == "done")
    shown = await (await client.get(started.headers["Location"])).json()
    assert shown["digest"] == ref.oci_digest and shown["state"] == "done"
    assert gated.package_requests("condery-hello") == 1


async def test_a_queued_pull_that_is_dropped_leaves_no_status(make_service, gated: GatedChannel) -> None:  # noqa: F811
    service = await make_service(max_concurrent_builds=1, max_queued_builds=1)
    running = asyncio.ensure_future(service.resolve(parse_name("condery-hello", {}), Latest(), "10.0.0.1"))
    await until(lambda: gated.package_requests("condery-hello"))
    queued = asyncio.ensure_future(service.resolve(parse_name("zlib", {}), Latest(), "10.0.0.2"))
    await until(lambda: len(service.outcomes.builds.listing()) == 2)
    assert {s.state for s in service.outcomes.builds.listing()} == {"building", "queued"}
    queued.cancel()  # its client hung up before it got a slot: dropped
    await asyncio.wait([queued])
    assert [s.name for s in service.outcomes.builds.listing()] == ["condery-hello"]
    gated.packages.set()
    await running
    assert [s.state for s in service.outcomes.builds.listing()] == ["done"]


async def test_a_prebuild_of_an_expired_image_refreshes_it_as_a_pull_would(
    aiohttp_client: Any, make_service, gated: GatedChannel  # noqa: F811
) -> None:
    gated.packages.set()
    service = await make_service(latest_ttl=0)
    client = await aiohttp_client(create_app(service, service.store))
    builds = counting_builds(service)
    first = await client.post("/api/v1/builds", json={"name": "condery-hello"})
    assert first.status == 202
    location = first.headers["Location"]
    await until(lambda: service.outcomes.builds.get(location.rsplit("/", 1)[1]).state == "done")
    again = await client.post("/api/v1/builds", json={"name": "condery-hello"})
    assert again.status == 200 and (await again.json())["state"] == "done"
    await service.refreshes_settled()
    assert builds == ["condery-hello", "condery-hello"]  # the second one: the refresh
