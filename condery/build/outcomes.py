"""What became of image builds and looks: one memory of outcomes, read three ways.

- `unsolvable(key)`: a definitive "no" for an image key (the name cannot be solved on
  any platform), answered for `failed_solve_ttl` seconds without solving again.
  Repeating such a name must not cost a solve each time; a passing fault (a timeout, a
  channel down) is never remembered here, it must be retried. Bounded: a client
  inventing failing names cannot grow it.
- `recent_failures()`: the last few failures with their reasons (newest first), for the
  landing page, so an operator sees what failed and why without reading logs.
- `builds`: the statuses of builds in flight and recently finished (progress.py), for
  the builds API.

Every failure a client is answered with enters through `failed()`, so the page, the
builds API and the log tell the same story.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from condery.build.progress import BuildTracker
from condery.common.redact import redact_text
from condery.oci.errors import RegistryError

RECENT_FAILURES = 20
MAX_UNSOLVABLE = 10_000


@dataclass(frozen=True)
class Failure:
    at: float  # wall clock
    name: str
    tag: str
    code: str
    message: str  # credentials removed


@dataclass
class Outcomes:
    unsolvable_ttl: float  # seconds a definitive solve failure is answered without solving
    recent_size: int = RECENT_FAILURES
    max_unsolvable: int = MAX_UNSOLVABLE
    builds: BuildTracker = field(default_factory=BuildTracker)

    def __post_init__(self) -> None:
        self._unsolvable: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (expires, message)
        self._failures: deque[Failure] = deque(maxlen=self.recent_size)

    # -- definitive answers, by image key --------------------------------------------
    def unsolvable(self, key: str) -> str | None:
        """Why the image of `key` cannot be solved, if that was found out recently."""
        entry = self._unsolvable.get(key)
        if entry is None:
            return None
        expires, message = entry
        if time.monotonic() >= expires:
            del self._unsolvable[key]
            return None
        return message

    def remember_unsolvable(self, key: str, message: str) -> None:
        if self.unsolvable_ttl <= 0:
            return
        self._unsolvable.pop(key, None)
        self._unsolvable[key] = (time.monotonic() + self.unsolvable_ttl, message)
        while len(self._unsolvable) > self.max_unsolvable:
            self._unsolvable.popitem(last=False)

    # -- what clients were told ---------------------------------------------------------
    def failed(self, name: str, tag: str, error: RegistryError) -> None:
        self._failures.appendleft(Failure(time.time(), name, tag, error.code, redact_text(error.message)))

    def recent_failures(self) -> list[Failure]:
        return list(self._failures)
