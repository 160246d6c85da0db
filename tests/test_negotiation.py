"""Which manifest a client gets: family and shape from all of its Accept values, and
the platform manifest a client that reads no index gets."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from condery.oci.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from condery.registry.negotiation import (
    ChildManifest,
    Choice,
    client_platform,
    negotiate,
    parse_accept,
    platform_manifest,
)
from condery.oci.platforms import OciPlatform

DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def choose_variant(lines: list[str]) -> str:
    return negotiate(lines).variant


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


def test_oci_only_images_go_to_docker_clients_that_take_oci() -> None:
    """zstd images have no Docker schema 2 form (build/pipeline.py): OCI to whoever accepts it."""
    # Docker 23+ and containerd prefer Docker types but list OCI ones too.
    choice = negotiate([f"{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}, {OCI_MANIFEST};q=0.5, {OCI_INDEX};q=0.5"],
                       oci_only=True)
    assert choice == Choice("oci", True, True)
    assert negotiate([DOCKER_MANIFEST, OCI_MANIFEST + ";q=0.1"], oci_only=True) == Choice("oci", False, True)
    assert negotiate([], oci_only=True) == Choice("oci", True, True)
    # A client that takes no OCI type at all cannot be served the image.
    assert negotiate([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST], oci_only=True).acceptable is False
    assert negotiate([DOCKER_MANIFEST, f"{OCI_MANIFEST};q=0"], oci_only=True).acceptable is False
    # Without oci_only nothing changes for that client.
    assert negotiate([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST]) == Choice("docker", True, True)


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


# -- shape: index or one platform's manifest (CNCF Distribution's rule) -------------------


def test_clients_that_read_indexes_get_them() -> None:
    assert negotiate([OCI_MANIFEST, OCI_INDEX]) == Choice("oci", True)
    assert negotiate([DOCKER_MANIFEST, DOCKER_MANIFEST_LIST]) == Choice("docker", True)
    skopeo = [OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_V1_SIGNED, DOCKER_V1, DOCKER_MANIFEST_LIST, OCI_INDEX]
    assert negotiate(skopeo) == Choice("oci", True)


def test_clients_that_name_only_single_manifests_get_one() -> None:
    assert negotiate([OCI_MANIFEST]) == Choice("oci", False)
    assert negotiate([DOCKER_MANIFEST]) == Choice("docker", False)
    # Old Docker clients: schema 2 and schema 1, no list.
    assert negotiate([f"{DOCKER_MANIFEST}, {DOCKER_V1_SIGNED}"]) == Choice("docker", False)
    # An index given q=0 is refused as plainly as one left out.
    assert negotiate([f"{OCI_MANIFEST}, {OCI_INDEX};q=0"]) == Choice("oci", False)
    # The Docker list does not stand in for the OCI index once OCI is chosen.
    assert negotiate([OCI_MANIFEST, DOCKER_MANIFEST_LIST]) == Choice("oci", False)


def test_no_preference_keeps_the_index() -> None:
    for lines in ([], [""], ["*/*"], ["application/*"], ["application/json"], [DOCKER_V1_SIGNED], [OCI_INDEX]):
        assert negotiate(lines).takes_index, lines
    assert negotiate([OCI_MANIFEST, "*/*"]).takes_index


def test_client_platform_from_dockers_user_agent() -> None:
    docker = (
        "docker/24.0.7 go/go1.20.10 git-commit/311b9ff kernel/6.1.0 os/linux arch/arm64"
        " UpstreamClient(Docker-Client/24.0.7)"
    )
    assert client_platform(docker) == OciPlatform("linux", "arm64")
    assert client_platform("docker/1.13 os/Linux arch/AMD64") == OciPlatform("linux", "amd64")
    others = (None, "", "skopeo/1.13.3", "containerd/1.7.0", "Python-urllib/3.11", "os/linux", "macos/13 arch/x")
    for user_agent in others:
        assert client_platform(user_agent) is None, user_agent


def _index(*platforms: dict[str, str] | None, media_type: str = OCI_MANIFEST) -> bytes:
    entries = []
    for n, platform in enumerate(platforms):
        entry: dict = {"mediaType": media_type, "digest": f"sha256:{n:064x}", "size": 10}
        if platform is not None:
            entry["platform"] = platform
        entries.append(entry)
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64", "variant": "v8"}


def test_platform_manifest_matches_the_client_else_the_first() -> None:
    index = _index(ARM64, AMD64)
    first, second = ChildManifest(f"sha256:{0:064x}", OCI_MANIFEST), ChildManifest(f"sha256:{1:064x}", OCI_MANIFEST)
    assert platform_manifest(index, None) == first
    assert platform_manifest(index, OciPlatform("linux", "amd64")) == second
    # Docker's User-Agent names no variant: arm64 matches arm64/v8.
    assert platform_manifest(index, OciPlatform("linux", "arm64")) == first
    # A platform the index does not hold: the first, as for a client that names none.
    assert platform_manifest(index, OciPlatform("linux", "s390x")) == first
    docker_list = _index(AMD64, ARM64, media_type=DOCKER_MANIFEST)
    assert platform_manifest(docker_list, OciPlatform("linux", "arm64")) == ChildManifest(
        f"sha256:{1:064x}", DOCKER_MANIFEST
    )


def test_platform_manifest_skips_what_is_not_a_platform_image() -> None:
    # Entries without a platform (attestations, nested indexes) are never served as one.
    assert platform_manifest(_index(None, AMD64), None) == ChildManifest(f"sha256:{1:064x}", OCI_MANIFEST)
    assert platform_manifest(_index(AMD64, media_type=OCI_INDEX), None) is None
    for document in (b"", b"[]", b"{}", b'{"manifests": 3}', b'{"manifests": [1, "x"]}', b"\xff"):
        assert platform_manifest(document, None) is None


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
    # A client never loses the index unless it named the family's single manifest.
    choice = negotiate(lines)
    single = OCI_MANIFEST if choice.variant == "oci" else DOCKER_MANIFEST
    assert choice.takes_index or any(single in line.lower() for line in lines)
    for media_type, q in parse_accept(lines).items():
        assert 0.0 <= q <= 1.0, (media_type, q)  # never NaN, never outside [0, 1]
        assert media_type == media_type.lower() and media_type.strip() == media_type
