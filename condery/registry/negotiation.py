"""Media types, and which manifest a client gets: family (OCI or Docker schema 2) and shape.

Clients send several `Accept:` lines (skopeo sends six), each possibly a comma-separated
list with q-values, so every value is read. OCI is served unless the client prefers
Docker types: it accepts no OCI manifest type, or ranks them strictly lower.

On a multi-platform registry the tag names an index (OCI) or manifest list (Docker). As
CNCF Distribution does (registry/handlers/manifests.go), a client that accepts the
family's single manifest but not its index gets one platform's manifest instead of a
document it said it cannot read: the platform its User-Agent names (Docker's carries
`os/linux arch/arm64`), else the index's first entry, which is the first configured
platform (Distribution's fixed default is linux/amd64; condery has no fixed platform).
A client that names neither type, or a wildcard, gets the index.

Images with zstd layers (layer_compression: zstd) exist as OCI documents only: Docker
schema 2 has no zstd layer type. A client that prefers Docker types but accepts OCI
ones too (Docker 23+, containerd) gets the OCI document; one that accepts no OCI type
at all (an old Docker engine) cannot unpack zstd anyway and is told so (404
MANIFEST_UNKNOWN naming the reason, as for any manifest it cannot be served).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal

from condery.oci.manifest import ManifestError
from condery.oci.media_types import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from condery.oci.platforms import OciPlatform
from condery.oci.references import platform_entries, references, select_platform

OCI_MANIFEST_TYPES = frozenset({OCI_MANIFEST, OCI_INDEX})
DOCKER_MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, DOCKER_MANIFEST_LIST})

Variant = Literal["oci", "docker"]


def parse_accept(accept_values: Iterable[str]) -> dict[str, float]:
    """Media type (lowercased, parameters dropped) -> the highest q it was given."""
    accepted: dict[str, float] = {}
    for header in accept_values:
        for item in header.split(","):
            media_type, *params = (part.strip() for part in item.split(";"))
            if not media_type:
                continue
            q = 1.0
            for param in params:
                key, _, value = param.partition("=")
                if key.strip().lower() == "q":
                    try:
                        q = float(value)
                    except ValueError:
                        q = 0.0  # an unreadable q does not make a type acceptable
                    # float() also reads "nan", which no comparison would clamp.
                    q = min(max(q, 0.0), 1.0) if q == q else 0.0
            media_type = media_type.lower()
            accepted[media_type] = max(q, accepted.get(media_type, 0.0))
    return accepted


def _best(accepted: dict[str, float], types: frozenset[str]) -> float:
    wildcard = max(accepted.get("*/*", 0.0), accepted.get("application/*", 0.0))
    return max([wildcard, *(accepted.get(t, 0.0) for t in types)])


def _variant(accepted: dict[str, float]) -> Variant:
    """"oci" or "docker" for the client's accepted types (all of its Accept lines)."""
    oci = _best(accepted, OCI_MANIFEST_TYPES)
    docker = _best(accepted, DOCKER_MANIFEST_TYPES)
    # No Accept, or only types we cannot serve (Docker schema 1): OCI, the default.
    return "docker" if docker > oci else "oci"


# The single-manifest and index types of each family.
_SHAPES: dict[Variant, tuple[str, str]] = {
    "oci": (OCI_MANIFEST, OCI_INDEX),
    "docker": (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST),
}


@dataclass(frozen=True)
class Choice:
    """What a client asked for: a family, and whether it reads that family's index."""

    variant: Variant
    takes_index: bool
    acceptable: bool = True  # False: the image is OCI-only and the client takes no OCI type


def negotiate(accept_values: list[str], oci_only: bool = False) -> Choice:
    """The family and shape of manifest for the client's Accept header values
    (`oci_only`: the image has no Docker schema 2 form)."""
    accepted = parse_accept(accept_values)
    variant = _variant(accepted)
    acceptable = True
    if oci_only and variant == "docker":
        variant, acceptable = "oci", _best(accepted, OCI_MANIFEST_TYPES) > 0
    single, index = _SHAPES[variant]
    # Only a client that names the single manifest (or a wildcard) and gives the index
    # no q is refused it: no Accept at all, or only other types, keeps the default.
    takes_index = not (_best(accepted, frozenset({single})) > 0 and _best(accepted, frozenset({index})) == 0)
    return Choice(variant, takes_index, acceptable)


# Docker's User-Agent: "docker/24.0.7 go/go1.20.10 git-commit/311b9ff kernel/6.1 os/linux arch/arm64 ..."
_UA_OS_RE = re.compile(r"(?:^|\s)os/([A-Za-z0-9_.-]+)")
_UA_ARCH_RE = re.compile(r"(?:^|\s)arch/([A-Za-z0-9_.-]+)")


def client_platform(user_agent: str | None) -> OciPlatform | None:
    """The platform a client names in its User-Agent (`os/… arch/…`), None if it names none."""
    if not user_agent:
        return None
    os_match = _UA_OS_RE.search(user_agent)
    arch_match = _UA_ARCH_RE.search(user_agent)
    if os_match is None or arch_match is None:
        return None
    return OciPlatform(os_match.group(1).lower(), arch_match.group(1).lower())


@dataclass(frozen=True)
class ChildManifest:
    """One platform's manifest, as an index lists it."""

    digest: str
    media_type: str


def platform_manifest(index: bytes, wanted: OciPlatform | None) -> ChildManifest | None:
    """The entry of an index (or manifest list) for `wanted`, else its first platform's.

    None when the document lists no platform manifest at all (condery writes none such;
    the caller then says the manifest is unknown, as Distribution does).
    """
    try:
        entries = platform_entries(references(index).manifests)
    except ManifestError:
        return None
    chosen = (select_platform(entries, wanted) if wanted is not None else None) or (entries[0] if entries else None)
    return None if chosen is None else ChildManifest(chosen.digest, chosen.media_type)
