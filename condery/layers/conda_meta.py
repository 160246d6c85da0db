"""A package's conda-meta record as an image holds it: nothing of the machine that built it.

Both ways of building a package layer (rattler's install, stream_layer.py's plan) end
with the record rattler's PrefixRecord gives; these are the rules that make it the
image's: the build machine's paths and this install's facts dropped, the channel's own
URL (not the verified local copy's) named, credentials redacted.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import orjson

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


# The package's own relative paths (from its paths.json, checked to stay in the prefix):
# neither a local directory of this host nor a channel URL can be in them, and they must
# name the layer's files as they are. Walking them was 6 % of a large package's layer.
PACKAGE_PATH_KEYS = ("files", "paths_data")


def scrub_record(data: dict[str, Any], source: Source) -> dict[str, Any]:
    for key in BUILD_MACHINE_KEYS:
        data.pop(key, None)
    # The install saw our verified local copy; the image must name the real source.
    data["url"] = source.url
    data["channel"] = source.channel
    data["fn"] = source.file_name
    # Images are served to anyone: no channel credential may ride along in a URL.
    return {k: v if k in PACKAGE_PATH_KEYS else redact_values(v) for k, v in data.items()}


def contains_path(data: dict[str, Any], needles: tuple[str, ...]) -> bool:
    """Whether the record holds one of `needles` (local directories) outside the package's paths."""
    return any(_holds(v, needles) for k, v in data.items() if k not in PACKAGE_PATH_KEYS)


def _holds(value: Any, needles: tuple[str, ...]) -> bool:
    if isinstance(value, str):
        return any(n in value for n in needles)
    if isinstance(value, dict):
        return any(_holds(v, needles) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, needles) for v in value)
    return False


def record_bytes(data: dict[str, Any]) -> bytes:
    """The record as its file in the layer holds it: rattler's format, which is
    `json.dumps(data, indent=2, sort_keys=True)` and a newline.

    With an indent, Python's json encodes in Python (the C encoder only writes compact
    JSON): a third of a second for a package of 60,000 files. orjson writes the same bytes
    for what these records hold (str, int, bool, None, lists and objects with str keys),
    as long as they are printable ASCII: Python escapes everything else (\\uXXXX,
    DEL included) where orjson writes UTF-8. Anything else, or a float anywhere outside
    the package's paths (whose values this module's callers make: str, int, bool), takes
    Python's encoder. tests/test_conda_meta.py compares the two on generated records.
    """
    if not any(_has_float(v) for k, v in data.items() if k not in PACKAGE_PATH_KEYS):
        try:
            fast = orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        except (TypeError, orjson.JSONEncodeError):  # e.g. an int past 64 bits
            fast = b""
        if fast and fast.isascii() and b"\x7f" not in fast:
            return fast + b"\n"
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _has_float(value: Any) -> bool:
    if isinstance(value, float):
        return True
    if isinstance(value, dict):
        return any(_has_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_float(v) for v in value)
    return False
