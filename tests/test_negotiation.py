"""Which manifest family a client gets, from all of its Accept values."""

from __future__ import annotations

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
