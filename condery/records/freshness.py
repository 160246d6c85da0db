"""When a record still answers for its tag, and how old the repodata behind it may be.

A `latest` record answers for `latest_ttl` seconds counted from when the repodata it
was solved against was fetched (not from when the solve ran), a date tag the same way
until its day ended `snapshot_grace` ago, and a date record solved after that point
answers forever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import rattler

from condery.common.redact import redact_url
from condery.image.tags import Latest, Snapshot
from condery.layers.solve import channel

log = logging.getLogger("condery.cache")


class Dated(Protocol):
    """What freshness reads of a record or a solve: when its oldest repodata was fetched."""

    @property
    def data_as_of(self) -> float: ...


@dataclass(frozen=True)
class Freshness:
    """When a record still answers for its tag."""

    latest_ttl: float
    snapshot_grace: float

    def final_from(self, reference: Latest | Snapshot) -> float | None:
        """The wall-clock time from which a solve of `reference` never changes (None: never)."""
        if isinstance(reference, Latest):
            return None
        return reference.exclude_newer.timestamp() + self.snapshot_grace

    def is_final(self, record: Dated, reference: Latest | Snapshot) -> bool:
        final_from = self.final_from(reference)
        return final_from is not None and record.data_as_of >= final_from

    def is_fresh(self, record: Dated, reference: Latest | Snapshot, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.is_final(record, reference):
            return True
        final_from = self.final_from(reference)
        if final_from is not None and now >= final_from:
            return False  # solved during the grace period, which is over: one last solve
        return now - record.data_as_of < self.latest_ttl


class RepodataClock:
    """Per channel, when its repodata was last fetched; drops what is older than the TTL.

    rattler's gateway keeps repodata in memory until told otherwise. Each channel is
    dropped on its own clock, and a solve reports the oldest fetch time among its
    channels, so that a record's age counts from the data it saw, not from the solve.
    """

    def __init__(self, gateway: rattler.Gateway, ttl: float) -> None:
        self.gateway = gateway
        self.ttl = ttl
        self._fetched_at: dict[str, float] = {}  # channel -> wall clock

    def refresh(self, channels: Sequence[str], *, force: bool = False, now: float | None = None) -> float:
        """Drop each channel's repodata older than the TTL (all of it with `force`); the
        oldest fetch time left among `channels`."""
        now = time.time() if now is None else now
        for name in channels:
            fetched = self._fetched_at.get(name)
            if force or fetched is None or now - fetched >= self.ttl:
                self.gateway.clear_repodata_cache(channel(name))
                self._fetched_at[name] = now
                log.info("repodata of %s: re-read on next use", redact_url(name))
        return min((self._fetched_at[name] for name in channels), default=now)

    def expire(self) -> None:
        """Forget every fetch time: the next solve re-reads every channel."""
        self._fetched_at.clear()
