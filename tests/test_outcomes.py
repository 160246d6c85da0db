"""The one memory of outcomes (condery/build/outcomes.py): definitive solve failures by
image key expire and are bounded, recent failures are the newest few without
credentials, and build statuses live beside them."""

from __future__ import annotations

import time

from condery.build.outcomes import Outcomes
from condery.oci import errors


def test_unsolvable_is_answered_until_it_expires() -> None:
    outcomes = Outcomes(unsolvable_ttl=0.05)
    outcomes.remember_unsolvable("k", "nothing provides nump")
    assert outcomes.unsolvable("k") == "nothing provides nump"
    assert outcomes.unsolvable("other") is None
    time.sleep(0.06)
    assert outcomes.unsolvable("k") is None


def test_unsolvable_is_bounded_oldest_first_and_off_at_ttl_zero() -> None:
    outcomes = Outcomes(unsolvable_ttl=60, max_unsolvable=2)
    for key in ("a", "b", "c"):
        outcomes.remember_unsolvable(key, key)
    assert [outcomes.unsolvable(k) for k in ("a", "b", "c")] == [None, "b", "c"]
    off = Outcomes(unsolvable_ttl=0)
    off.remember_unsolvable("k", "no")
    assert off.unsolvable("k") is None


def test_failures_are_the_newest_few_without_credentials() -> None:
    outcomes = Outcomes(60, recent_size=2)
    for i in range(3):
        outcomes.failed(f"n{i}", "latest", errors.Unavailable(f"https://u:pw-{i}@example.org/t/tk-{i}/c down"))
    recent = outcomes.recent_failures()
    assert [(f.name, f.code) for f in recent] == [("n2", "UNAVAILABLE"), ("n1", "UNAVAILABLE")]
    assert all("pw-" not in f.message and "tk-" not in f.message for f in recent)


def test_build_statuses_are_kept_beside_the_failures() -> None:
    outcomes = Outcomes(60)
    status = outcomes.builds.start("key", "xz", "latest")
    assert outcomes.builds.of("key") is status
