"""Each platform's base image as the builder uses it: resolved, remembered briefly, and
resolved again when it may have changed.

The base is part of every image's cache key, so a warm pull needs it too: it is
resolved again at most every BASE_RECHECK seconds (reading it costs more than the rest
of a warm pull), at once after the store removed a blob (it may have been one of the
base's), and when it cannot be resolved after it was once, the last good one stands in
(stale-if-error).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from condery.bases.auth import RegistryAuth
from condery.bases.errors import BaseImageError
from condery.bases.resolve import resolve_base_image
from condery.common.singleflight import SingleFlight
from condery.config import Config
from condery.oci import errors
from condery.oci.platforms import oci_platform
from condery.records.schemas import BaseImage
from condery.storage import StorageError, Store, store_fault_reason

log = logging.getLogger("condery.build")
BASE_RECHECK = 30  # seconds a resolved base image is used before it is resolved again


class PlatformBases:
    def __init__(self, config: Config, store: Store, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.store = store
        self.http = http
        self._flights: SingleFlight[BaseImage] = SingleFlight()
        self._last: dict[str, BaseImage] = {}
        self._checked_at = 0.0  # time.monotonic() of the last successful resolution
        self._generation = -1  # the store's removal_generation at that resolution

    async def for_platforms(self) -> dict[str, BaseImage]:
        """Each platform's base as resolved now: part of the image's cache key.

        Resolved again at most every BASE_RECHECK seconds: reading it costs more than
        the rest of a warm pull, and a base changes rarely (a layout rewritten in place,
        a configuration change, which restarts the process anyway). When the base cannot
        be resolved (its registry or layout broken) after this process resolved it once,
        the last good one stands in (stale-if-error): images built on it are still
        served, and builds use it, until the base is back.
        """
        # A shorter base_image_refresh is honoured: a moved tag shows within it. A blob
        # removed since (found truncated or corrupt) may be one of the bases': they are
        # resolved again, which imports a base whose layer went, before anything is
        # built on it.
        recheck = min(BASE_RECHECK, self.config.base_image_refresh)
        if (self._last and time.monotonic() - self._checked_at < recheck
                and self._generation == self.store.removal_generation):
            return dict(self._last)
        generation = self.store.removal_generation
        try:
            bases = dict(zip(self.config.platforms, await asyncio.gather(
                *(self.of(subdir) for subdir in self.config.platforms)
            )))
        except (BaseImageError, StorageError) as exc:  # the base's registry, layout, or the store it goes to
            if set(self._last) != set(self.config.platforms):
                if isinstance(exc, StorageError):
                    raise errors.Unavailable(
                        f"the base image cannot be stored: {store_fault_reason(exc) or 'the store failed'}"
                    ) from None
                raise errors.Unavailable(str(exc)) from None
            log.warning("using the last good base image: %s", exc)
            return dict(self._last)
        self._last, self._checked_at, self._generation = bases, time.monotonic(), generation
        return bases

    def recheck(self) -> None:
        """Resolve the bases again on the next pull, however recently they were."""
        self._checked_at = -BASE_RECHECK

    async def of(self, subdir: str) -> BaseImage:
        """The base image for a platform, fetched once however many builds need it."""
        platform = oci_platform(subdir)
        return await self._flights.run(
            subdir,
            lambda: resolve_base_image(
                self.config.base_image, platform, self.store, self.http, layer_budget=self.config.layer_budget,
                auth=RegistryAuth.from_setting(self.config.base_image_auth_file),
                refresh=self.config.base_image_refresh,
            ),
        )
