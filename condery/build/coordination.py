"""Cross-replica single flight: one cold build of an image key at a time, whichever
replica is asked.

Inside one process the BuildQueue already joins requests for the same key. Replicas on
one bucket do not see each other's queues, so with `coordination: {backend: redis}`
a replica takes a Redis lock on the key before it builds (SET NX PX with a random
token, renewed every lease/3 while building, released by compare-and-delete on that
token). A replica that finds the lock held waits for the other's image record; when
the lock goes away without a record (the holder failed, or was killed and its lease
ran out) it tries to take the lock itself.

Redis is an optimisation, never a dependency of a pull: when it cannot be reached the
replica builds without it (layers and manifests are deterministic, so two replicas
building the same key write the same blobs) and says so in the log at most once per
`DOWN_LOG_INTERVAL`. The `local` backend (one replica) does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Awaitable, Callable, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from condery.config import CoordinationConfig
from condery.oci import errors

log = logging.getLogger("condery.coordination")
T = TypeVar("T")

LOCK_PREFIX = "condery:build-lock:"
DOWN_LOG_INTERVAL = 60.0  # seconds between two "Redis unreachable" warnings
POLL_INTERVAL = 0.5  # seconds between two looks at another replica's build
REDIS_TIMEOUT = 2.0  # seconds for one Redis command: a dead Redis must not hold a pull up

# Renew and release only while the lock is still ours (the token matches): a holder
# whose lease ran out must not extend or delete a lock another replica has taken since.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

Work = Callable[[], Awaitable[T]]
Finished = Callable[[], Awaitable["T | None"]]


class Coordinator(Protocol):
    async def wait_elsewhere(self, key: str, finished: Finished[T], timeout: float) -> T | None:
        """The result of another replica's build of `key` in progress, or None when no
        other replica builds it (or Redis is down)."""
        ...

    async def exclusive(self, key: str, work: Work[T], finished: Finished[T], timeout: float) -> T:
        """`work()` under the key's lock, or the result another replica built meanwhile."""
        ...

    async def close(self) -> None: ...


class LocalCoordinator:
    """One replica: the BuildQueue's single flight is all there is."""

    async def wait_elsewhere(self, key: str, finished: Finished[T], timeout: float) -> T | None:
        return None

    async def exclusive(self, key: str, work: Work[T], finished: Finished[T], timeout: float) -> T:
        return await work()

    async def close(self) -> None:
        return None


class RedisCoordinator:
    """Build locks in Redis, with a lease so that a killed holder blocks nobody for long."""

    def __init__(self, url: str, lease: float, on_event: Callable[[str], None] | None = None) -> None:
        self.lease = lease
        self._client = aioredis.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT,
        )
        self._renew = self._client.register_script(_RENEW)
        self._release = self._client.register_script(_RELEASE)
        self._down_logged_at = -DOWN_LOG_INTERVAL
        self._on_event = on_event or (lambda _: None)  # metrics: acquired, waited, unavailable

    # -- the lock ---------------------------------------------------------------------
    async def acquire(self, key: str) -> str | None:
        """A token when the lock on `key` is now ours, None when another holds it.
        Raises RedisError when Redis cannot answer."""
        token = secrets.token_hex(16)
        taken = await self._client.set(LOCK_PREFIX + key, token, nx=True, px=int(self.lease * 1000))
        return token if taken else None

    async def renew(self, key: str, token: str) -> bool:
        return bool(await self._renew(keys=[LOCK_PREFIX + key], args=[token, int(self.lease * 1000)]))

    async def release(self, key: str, token: str) -> bool:
        return bool(await self._release(keys=[LOCK_PREFIX + key], args=[token]))

    async def held(self, key: str) -> bool:
        return bool(await self._client.exists(LOCK_PREFIX + key))

    # -- the protocol -----------------------------------------------------------------
    async def wait_elsewhere(self, key: str, finished: Finished[T], timeout: float) -> T | None:
        try:
            if not await self.held(key):
                return None
        except RedisError as exc:
            self._unavailable(exc)
            return None
        self._on_event("waited")
        return await self._wait(key, finished, time.monotonic() + timeout)

    async def exclusive(self, key: str, work: Work[T], finished: Finished[T], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            try:
                token = await self.acquire(key)
            except RedisError as exc:
                self._unavailable(exc)
                return await work()  # without de-duplication across replicas: harmless
            if token is not None:
                self._on_event("acquired")
                return await self._holding(key, token, work, finished)
            self._on_event("waited")
            result = await self._wait(key, finished, deadline)
            if result is not None:
                return result
            # The lock went without a result: its holder failed or died. Our turn.

    async def close(self) -> None:
        await self._client.aclose()

    # -- inside -----------------------------------------------------------------------
    async def _holding(self, key: str, token: str, work: Work[T], finished: Finished[T]) -> T:
        renewal = asyncio.ensure_future(self._keep(key, token))
        try:
            # Another replica may have finished between our look for the image and the
            # lock: one more read of the record saves a whole build.
            done = await finished()
            return done if done is not None else await work()
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            try:
                await self.release(key, token)
            except RedisError as exc:  # the lease runs out by itself
                self._unavailable(exc)

    async def _keep(self, key: str, token: str) -> None:
        """Renew the lease every lease/3 while the build runs: two renewals may fail
        (a Redis hiccup) before another replica may take the key."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                if not await self.renew(key, token):
                    log.warning("build lock key=%s lost (lease ran out); another replica may build it too", key)
                    return
            except RedisError as exc:
                self._unavailable(exc)

    async def _wait(self, key: str, finished: Finished[T], deadline: float) -> T | None:
        """Another replica's result, or None once its lock is gone without one.

        Bounded by the deadline (build_timeout): a waiter gets the 503 a build of its
        own would have got.
        """
        log.info("build key=%s in progress on another replica, waiting for it", key)
        while True:
            result = await finished()
            if result is not None:
                return result
            try:
                if not await self.held(key):
                    return await finished()  # written just before the release, or not at all
            except RedisError as exc:
                self._unavailable(exc)
                return None  # build it here
            if time.monotonic() >= deadline:
                raise errors.Unavailable("another replica's build of this image took longer than the build timeout")
            await asyncio.sleep(POLL_INTERVAL)

    def _unavailable(self, exc: Exception) -> None:
        self._on_event("unavailable")
        now = time.monotonic()
        if now - self._down_logged_at >= DOWN_LOG_INTERVAL:
            self._down_logged_at = now
            # The exception names host and port, never the URL's password.
            log.warning("coordination: Redis unavailable (%s: %s); building without cross-replica "
                        "de-duplication", type(exc).__name__, exc)


def open_coordinator(config: CoordinationConfig, on_event: Callable[[str], None] | None = None) -> Coordinator:
    if config.backend == "redis":
        assert config.url is not None  # validated by the configuration
        return RedisCoordinator(config.url, config.lease, on_event)
    return LocalCoordinator()
