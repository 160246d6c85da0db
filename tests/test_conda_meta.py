"""The conda-meta record as a layer holds it (condery/layers/conda_meta.py): record_bytes
writes exactly `json.dumps(indent=2, sort_keys=True)` and a newline (rattler's format,
and every layer digest), whichever encoder it takes; scrubbing and the local-path check
leave the package's own paths alone."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from condery.layers.conda_meta import contains_path, record_bytes, scrub_record


def rattler_format(data: dict) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


# What records hold, and what would tell the two encoders apart: control characters,
# DEL, non-ASCII (Python escapes it, orjson does not), big and negative integers, floats.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x80), max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=20)
paths = st.lists(st.fixed_dictionaries({
    "_path": st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x7e), min_size=1, max_size=20),
    "path_type": st.sampled_from(["hardlink", "softlink"]),
    "size_in_bytes": st.integers(min_value=0, max_value=2**40),
    "sha256": st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
}), max_size=5)


@settings(max_examples=400, deadline=None)
@given(top=st.dictionaries(st.text(max_size=8), values, max_size=6), entries=paths)
def test_record_bytes_are_json_dumps_with_indent_2(top: dict, entries: list) -> None:
    data = {**top, "paths_data": {"paths": entries, "paths_version": 1}, "files": [e["_path"] for e in entries]}
    assert record_bytes(data) == rattler_format(data)


def test_record_bytes_of_a_real_shape() -> None:
    data = {"name": "xz", "version": "5.2.5", "build": "h7b6447c_0", "depends": ["libgcc-ng >=7.3.0"],
            "size": 449_528, "timestamp": 1_594_049_936_000, "noarch": None, "license": "LGPL-2.1 and GPL-2.0",
            "files": ["bin/xz", "lib/liblzma.so"], "track_features": "", "empty": {}, "none": [],
            "paths_data": {"paths": [{"_path": "bin/xz", "path_type": "hardlink", "size_in_bytes": 1,
                                      "sha256": "0" * 64, "no_link": True}], "paths_version": 1},
            "summary": "tab\tnewline\nquote\"backslash\\del\x7fnon-ascii é"}
    assert record_bytes(data) == rattler_format(data)


@dataclass(frozen=True)
class Source:
    url: str
    channel: str
    file_name: str


def test_scrubbing_redacts_the_source_but_not_the_package_paths() -> None:
    odd = "share/doc/https://user:secret@example.com/x"  # a file the package really ships
    data = {"extracted_package_dir": "/var/cache/pkgs/xz", "link": {"source": "/x"}, "files": [odd],
            "paths_data": {"paths": [{"_path": odd}]}, "license": "see https://user:pw@host/l"}
    scrubbed = scrub_record(data, Source("https://u:tok@conda.example/c/linux-64/xz.conda",
                                         "https://u:tok@conda.example/c", "xz.conda"))
    assert "extracted_package_dir" not in scrubbed and "link" not in scrubbed
    assert "tok" not in scrubbed["url"] + scrubbed["channel"] and "pw" not in scrubbed["license"]
    assert scrubbed["files"] == [odd] and scrubbed["paths_data"]["paths"][0]["_path"] == odd
    assert contains_path({"url": "file:///var/cache/pkgs/x"}, ("/var/cache/pkgs",))
    assert contains_path({"nested": {"list": ["a", "/var/cache/pkgs/y"]}}, ("/var/cache/pkgs",))
    assert not contains_path({"files": ["var/cache/pkgs/y"], "paths_data": {"paths": [{"_path": "/var/cache/pkgs"}]}},
                             ("/var/cache/pkgs",))
