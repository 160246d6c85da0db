"""Which manifest family a client gets, from all of its Accept values."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from condery.registry.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from condery.registry.negotiation import choose_variant, parse_accept

DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def test_skopeo_sends_six_lines_and_gets_oci() -> None:
    lines = [OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_V1_SIGNED, DOCKER_V1, DOCKER_MANIFEST_LIST, OCI_INDEX]
    assert choose_variant(lines) == "oci"


def test_docker_only_client_gets_docker() -> None:
    assert choose_variant([DOCKER_MANIFEST]) == "docker"
    assert choose_variant([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_V1_SIGNED]) == "docker"
    # The same types comma-separated on one line.
    assert choose_variant([f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}"]) == "docker"


def test_docker_types_on_a_later_line_are_read() -> None:
    assert choose_variant(["application/json", DOCKER_MANIFEST_LIST]) == "docker"


def test_no_accept_means_oci() -> None:
    assert choose_variant([]) == "oci"
    assert choose_variant([""]) == "oci"
    assert choose_variant(["*/*"]) == "oci"
    # Only types condery cannot serve: the default.
    assert choose_variant([DOCKER_V1_SIGNED]) == "oci"


def test_q_values() -> None:
    assert choose_variant([f"{OCI_MANIFEST};q=0.5, {DOCKER_MANIFEST}"]) == "docker"
    assert choose_variant([f"{OCI_MANIFEST}; q=0", DOCKER_MANIFEST]) == "docker"
    assert choose_variant([f"{OCI_MANIFEST};q=0.9", f"{DOCKER_MANIFEST};q=0.9"]) == "oci"
    assert choose_variant([f"{DOCKER_MANIFEST};q=bogus", OCI_INDEX]) == "oci"
    # An OCI index is an OCI type too.
    assert choose_variant([f"{OCI_INDEX}", f"{DOCKER_MANIFEST};q=0.8"]) == "oci"


def test_parse_accept_normalises() -> None:
    accepted = parse_accept([f"{OCI_MANIFEST.upper()} ;q=0.3", f"{OCI_MANIFEST};q=0.7,, text/plain"])
    assert accepted == {OCI_MANIFEST: 0.7, "text/plain": 1.0}


def test_unreadable_q_values_count_as_zero() -> None:
    accepted = parse_accept([f"{DOCKER_MANIFEST};q=nan", f"{OCI_INDEX};q={'9' * 5000}", "a/b;q=-inf"])
    assert accepted == {DOCKER_MANIFEST: 0.0, OCI_INDEX: 1.0, "a/b": 0.0}
    assert choose_variant([f"{DOCKER_MANIFEST};q=nan"]) == "oci"


# -- fuzz: any Accept lines a client can send -----------------------------------------

_media_type = st.sampled_from(
    [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_V1, "*/*", "application/*", ""]
) | st.text(max_size=40)
_q = st.sampled_from(["1", "0", "0.5", "nan", "NaN", "inf", "-inf", "-1", "1e999", "9" * 400, "", "x"]) | st.text(
    max_size=10
)
_item = st.builds(
    lambda media_type, params: ";".join([media_type, *params]),
    _media_type,
    st.lists(st.builds(lambda key, q: f"{key}={q}", st.sampled_from(["q", "Q", " q ", "level"]), _q), max_size=3),
)
_line = st.lists(_item, max_size=6).map(", ".join) | st.text(max_size=200)


@settings(max_examples=500, deadline=None)
@given(st.lists(_line, max_size=8))
def test_any_accept_lines_give_a_variant_and_bounded_q(lines: list[str]) -> None:
    assert choose_variant(lines) in ("oci", "docker")
    for media_type, q in parse_accept(lines).items():
        assert 0.0 <= q <= 1.0, (media_type, q)  # never NaN, never outside [0, 1]
        assert media_type == media_type.lower() and media_type.strip() == media_type
