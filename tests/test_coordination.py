"""Cross-replica build locks (condery/build/coordination.py) against a real redis-server."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from condery.config import ConfigError, CoordinationConfig, effective_yaml, load_config
from condery.build.coordination import LocalCoordinator, RedisCoordinator, open_coordinator
from condery.oci import errors
from tests.fixtures.procs import free_port
from tests.fixtures.redis_server import RedisServer, redis  # noqa: F401 - the fixture


@pytest.fixture
async def pair(redis: RedisServer):
    """Two replicas' coordinators on one Redis, lease 1 s."""
    events: list[str] = []
    a, b = RedisCoordinator(redis.url, 1, events.append), RedisCoordinator(redis.url, 1, events.append)
    yield a, b, events
    await a.close()
    await b.close()


async def test_acquire_is_exclusive_until_released_by_its_token(pair) -> None:
    a, b, _ = pair
    token = await a.acquire("numpy/_/latest/f")
    assert token is not None
    assert await b.acquire("numpy/_/latest/f") is None
    assert await b.acquire("scipy/_/latest/f") is not None  # another key is another lock
    assert not await b.release("numpy/_/latest/f", "not-the-token")
    assert await a.held("numpy/_/latest/f")
    assert await a.release("numpy/_/latest/f", token)
    assert not await a.held("numpy/_/latest/f")
    assert await b.acquire("numpy/_/latest/f") is not None


async def test_renew_extends_the_lease_of_the_holder_only(pair) -> None:
    a, b, _ = pair
    token = await a.acquire("k")
    await asyncio.sleep(0.6)
    assert not await b.renew("k", "not-the-token")
    assert await a.renew("k", token)
    await asyncio.sleep(0.6)  # 1.2 s after the acquire: alive only because it was renewed
    assert await a.held("k")


async def test_a_lock_nobody_renews_expires_after_the_lease(pair) -> None:
    a, b, _ = pair
    assert await a.acquire("k") is not None  # the holder "dies": no renewal, no release
    assert await b.acquire("k") is None
    await asyncio.sleep(1.2)
    assert await b.acquire("k") is not None


async def test_a_holder_keeps_its_lock_while_it_builds_longer_than_the_lease(pair) -> None:
    a, b, _ = pair
    seen: list[bool] = []

    async def work() -> str:
        for _ in range(5):  # 2.5 s, lease 1 s
            await asyncio.sleep(0.5)
            seen.append(await b.acquire("k") is None)
        return "built"

    assert await a.exclusive("k", work, _nothing, 30) == "built"
    assert seen == [True] * 5
    assert not await a.held("k")  # released at the end


async def test_a_second_replica_waits_for_the_first_ones_result(pair) -> None:
    a, b, events = pair
    builds: list[str] = []
    record: list[str] = []

    async def work(who: str) -> str:
        builds.append(who)
        await asyncio.sleep(1.5)  # past the lease: renewed meanwhile
        record.append(f"digest-by-{who}")
        return record[0]

    async def finished() -> str | None:
        return record[0] if record else None

    first = asyncio.ensure_future(a.exclusive("k", lambda: work("a"), finished, 30))
    await asyncio.sleep(0.2)
    assert await b.wait_elsewhere("k", finished, 30) == "digest-by-a"
    # The lock is free again, but the record is there: no second build.
    second = await b.exclusive("k", lambda: work("b"), finished, 30)
    assert (await first, second) == ("digest-by-a", "digest-by-a")
    assert builds == ["a"]
    assert events.count("acquired") == 2 and "waited" in events  # b took the free lock, found it built


async def test_a_waiter_takes_over_when_the_holder_dies(pair) -> None:
    a, b, _ = pair
    assert await a.acquire("k") is not None  # killed while holding it: the lease runs out
    started = time.monotonic()
    assert await b.exclusive("k", _build("by-b"), _nothing, 30) == "by-b"
    assert 0.8 < time.monotonic() - started < 3


async def test_waiting_is_bounded_by_the_build_timeout(pair) -> None:
    a, b, _ = pair
    token = await a.acquire("k")
    renewal = asyncio.ensure_future(a._keep("k", token))  # alive and building, for ever
    try:
        with pytest.raises(errors.Unavailable, match="build timeout"):
            await b.exclusive("k", _build("by-b"), _nothing, 1.5)
    finally:
        renewal.cancel()


async def test_redis_down_builds_locally_and_logs_once(redis: RedisServer, caplog) -> None:
    events: list[str] = []
    coordinator = RedisCoordinator(redis.url, 1, events.append)
    redis.stop()
    caplog.set_level(logging.WARNING, "condery.coordination")
    started = time.monotonic()
    try:
        for i in range(3):
            assert await coordinator.wait_elsewhere("k", _nothing, 30) is None
            assert await coordinator.exclusive("k", _build(f"local-{i}"), _nothing, 30) == f"local-{i}"
    finally:
        await coordinator.close()
    assert time.monotonic() - started < 5  # refused at once, never waiting out a timeout
    warnings = [r.getMessage() for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "unavailable" in events


async def test_redis_back_after_an_outage_is_used_again(redis: RedisServer) -> None:
    coordinator = RedisCoordinator(redis.url, 1)
    try:
        redis.stop()
        assert await coordinator.exclusive("k", _build("local"), _nothing, 30) == "local"
        redis.start()
        token = await coordinator.acquire("k")
        assert token is not None and await coordinator.held("k")
    finally:
        await coordinator.close()


async def test_local_backend_is_the_work_itself() -> None:
    local = open_coordinator(CoordinationConfig())
    assert isinstance(local, LocalCoordinator)
    assert await local.wait_elsewhere("k", _nothing, 1) is None
    assert await local.exclusive("k", _build("x"), _nothing, 1) == "x"


# -- configuration ---------------------------------------------------------------------

def test_config_reads_a_redis_coordination() -> None:
    config = load_config(environ={}, coordination={"backend": "redis", "url": "redis://10.0.0.5:6379/2", "lease": 5})
    assert config.coordination == CoordinationConfig("redis", "redis://10.0.0.5:6379/2", 5)
    assert load_config(environ={}).coordination == CoordinationConfig("local")
    # Read back from `condery config`'s output, with a password in the URL masked.
    shown = effective_yaml(load_config(environ={}, coordination={"backend": "redis", "url": "redis://:s3cret@r:6379/0"}))
    assert "s3cret" not in shown and "coordination:" in shown


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ({"backend": "etcd"}, "coordination.backend: expected local or redis, got 'etcd'"),
        ({"backend": "redis"}, "coordination.url: required for the redis backend"),
        ({"backend": "redis", "url": "http://r:6379"}, "coordination.url: expected a redis://HOST:PORT/DB URL"),
        ({"backend": "redis", "url": "redis://r", "lease": 0}, "coordination.lease: 0 is out of range"),
        ({"backend": "redis", "url": "redis://r", "leese": 3}, "coordination.leese: unknown key (did you mean lease?)"),
        ({"backend": "local", "url": "redis://r"}, "coordination.url: not a key of the local backend"),
        ("redis", "coordination: expected a mapping"),
    ],
)
def test_config_refuses_bad_coordination(value, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={}, coordination=value)
    assert problem in str(caught.value)


def test_config_from_the_environment() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    config = load_config(environ={"CONDERY_COORDINATION": f"{{backend: redis, url: '{url}'}}"})
    assert config.coordination.url == url and config.coordination.lease == 30


def _build(result: str):
    async def work() -> str:
        return result
    return work


async def _nothing() -> None:
    return None
