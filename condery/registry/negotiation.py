"""Media types, and which manifest family (OCI or Docker schema 2) a client gets.

Clients send several `Accept:` lines (skopeo sends six), each possibly a comma-separated
list with q-values, so every value is read. OCI is served unless the client prefers
Docker types: it accepts no OCI manifest type, or ranks them strictly lower.
"""

from __future__ import annotations

from typing import Iterable, Literal

from condery.registry.media_types import (
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
)

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


def choose_variant(accept_values: list[str]) -> Variant:
    """"oci" or "docker" for the client's Accept header values (all of its lines)."""
    accepted = parse_accept(accept_values)
    oci = _best(accepted, OCI_MANIFEST_TYPES)
    docker = _best(accepted, DOCKER_MANIFEST_TYPES)
    # No Accept, or only types we cannot serve (Docker schema 1): OCI, the default.
    return "docker" if docker > oci else "oci"
