"""Failed logins, counted per client address and per user name over a sliding window.

Past `per_client` failures from one address (or `per_user` for one name, from any
address) within `window` seconds, logins from that address (for that name) are answered
`429 TOOMANYREQUESTS` with `Retry-After` without looking at the password, until the
oldest failure leaves the window. Refused attempts are not counted again, so a client
that keeps trying is let in again once the window has passed. Requests without
credentials are never limited here: anonymous pulls and other clients go on.

The per-user limit stops a guesser spread over many addresses; it can also lock a user
out for a window while someone guesses at that name (every registry with per-account
limits has this trade-off): keep it above `per_client`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from typing import Callable

from condery.config.schema import FailedLoginLimits

MAX_KEYS = 100_000  # addresses and names remembered at once; the oldest are forgotten first


class _Window:
    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float] | None:
        failures = self._failures.get(key)
        if failures is None:
            return None
        horizon = self.clock() - self.window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return None
        return failures

    def retry_after(self, key: str) -> int | None:
        failures = self._recent(key)
        if failures is None or len(failures) < self.limit:
            return None
        return max(1, math.ceil(failures[-self.limit] + self.window - self.clock()))

    def failed(self, key: str) -> None:
        failures = self._recent(key)
        if failures is None:
            failures = self._failures[key] = deque()
            while len(self._failures) > MAX_KEYS:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        failures.append(self.clock())
        while len(failures) > self.limit:
            failures.popleft()


class FailedLogins:
    def __init__(self, limits: FailedLoginLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.clients = _Window(limits.per_client, limits.window, clock)
        self.users = _Window(limits.per_user, limits.window, clock)

    def retry_after(self, client: str, user: str | None) -> int | None:
        """Seconds until this client (or this user name) may try again; None: it may now."""
        waits = [self.clients.retry_after(client)]
        if user:
            waits.append(self.users.retry_after(user))
        waits_set = [w for w in waits if w is not None]
        return max(waits_set) if waits_set else None

    def failed(self, client: str, user: str | None) -> None:
        self.clients.failed(client)
        if user:
            self.users.failed(user)
