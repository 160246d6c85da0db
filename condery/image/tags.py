"""Manifest references: `latest`, a `YYYY-MM-DD` snapshot, or a digest.

Anything else is MANIFEST_UNKNOWN (404) and is refused here, before any solve starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timezone

from condery.oci.errors import ManifestUnknown
from condery.oci.grammar import is_digest, is_tag

SNAPSHOT_RE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")

TAG_HINT = "condery serves the tags 'latest' and 'YYYY-MM-DD' (a past UTC day) and sha256 digests"


@dataclass(frozen=True)
class Latest:
    """Solved against the channels as they are now."""

    def __str__(self) -> str:
        return "latest"


@dataclass(frozen=True)
class Snapshot:
    """Solved against the channels as they were at the end of `day` (UTC)."""

    day: date
    exclude_newer: datetime  # the last instant of `day`, UTC: records after it are ignored

    @classmethod
    def of(cls, day: date) -> "Snapshot":
        return cls(day, datetime.combine(day, time.max, tzinfo=timezone.utc))

    def __str__(self) -> str:
        return self.day.isoformat()


@dataclass(frozen=True)
class Digest:
    digest: str  # "sha256:<64 hex>"

    def __str__(self) -> str:
        return self.digest


Reference = Latest | Snapshot | Digest


def tag_of(reference: Latest | Snapshot) -> str:
    """The tag a reference was asked for by (what image keys and the builds API name)."""
    return "latest" if isinstance(reference, Latest) else reference.day.isoformat()


def parse_reference(ref: str, now: datetime | None = None) -> Reference:
    """Classify a manifest reference; raises ManifestUnknown for anything unserved.

    A snapshot of a day that has not ended yet (UTC, at `now`) is refused: its answer
    could still change, but snapshots are cached forever.
    """
    if is_digest(ref):
        return Digest(ref)
    if ":" in ref:
        raise ManifestUnknown(f"unsupported digest {_shown(ref)}; condery serves sha256 digests")
    if not is_tag(ref):
        raise ManifestUnknown(f"invalid tag {_shown(ref)}; {TAG_HINT}")
    if ref == "latest":
        return Latest()
    match = SNAPSHOT_RE.fullmatch(ref)
    if match is None:
        raise ManifestUnknown(f"unknown tag {_shown(ref)}; {TAG_HINT}")
    try:
        day = date(*(int(part) for part in match.groups()))
    except ValueError:
        raise ManifestUnknown(f"{ref!r} is not a calendar date; {TAG_HINT}") from None
    snapshot = Snapshot.of(day)
    now = now or datetime.now(timezone.utc)
    if snapshot.exclude_newer >= now:
        raise ManifestUnknown(
            f"the UTC day {ref} has not ended yet, so its snapshot could still change; "
            "use 'latest' or an earlier day"
        )
    return snapshot


def _shown(ref: str) -> str:
    return repr(ref if len(ref) <= 80 else ref[:77] + "...")
