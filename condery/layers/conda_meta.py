"""A package's conda-meta record as an image holds it: nothing of the machine that built it.

Both ways of building a package layer (rattler's install, stream_layer.py's plan) end
with the record rattler's PrefixRecord gives; these are the rules that make it the
image's: the build machine's paths and this install's facts dropped, the channel's own
URL (not the verified local copy's) named, credentials redacted.
"""

from __future__ import annotations

from typing import Any, Protocol

from condery.common.redact import redact_values

# Keys of rattler's conda-meta record that hold paths of the machine that built the
# layer, or facts about this one install rather than the package.
BUILD_MACHINE_KEYS = (
    "extracted_package_dir",
    "package_tarball_full_path",
    "requested_spec",
    "requested_specs",
    "link",
    "installed_system_menus",
    "indexed_timestamp",  # when a channel was indexed, not a fact of the package
)


class Source(Protocol):
    """Where a package came from: a rattler RepoDataRecord, or stream_layer's PackageIdentity."""

    @property
    def url(self) -> str: ...

    @property
    def channel(self) -> str: ...

    @property
    def file_name(self) -> str: ...


def scrub_record(data: dict[str, Any], source: Source) -> dict[str, Any]:
    for key in BUILD_MACHINE_KEYS:
        data.pop(key, None)
    # The install saw our verified local copy; the image must name the real source.
    data["url"] = source.url
    data["channel"] = source.channel
    data["fn"] = source.file_name
    # Images are served to anyone: no channel credential may ride along in a URL.
    return redact_values(data)


def contains_path(value: Any, needles: tuple[str, ...]) -> bool:
    """Whether any string in a JSON value holds one of `needles` (local directories)."""
    if isinstance(value, str):
        return any(n in value for n in needles)
    if isinstance(value, dict):
        return any(contains_path(v, needles) for v in value.values())
    if isinstance(value, list):
        return any(contains_path(v, needles) for v in value)
    return False
