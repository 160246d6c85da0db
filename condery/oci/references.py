"""What an OCI document points at, and which child of an index is a platform's.

The one walker of manifests: the record cache checks an image's blobs with it before
the image is served, gc marks what is live with it, `condery build` copies an image
into a layout with it, and the images API lists layers with it. Stored documents are
read as strictly as fetched ones: a malformed one is a ManifestError for the caller to
answer (a miss and a rebuild, a warning in gc), never a KeyError in the pull path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence

from condery.common.jsonobject import json_object
from condery.oci.manifest import Descriptor, ManifestError, parse_descriptor
from condery.oci.media_types import MANIFEST_TYPES
from condery.oci.platforms import OciPlatform


@dataclass(frozen=True)
class References:
    """The descriptors of one index (`manifests`) or image manifest (`config`, `layers`)."""

    manifests: tuple[Descriptor, ...] = ()
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """What a manifest names that is not itself a manifest: its config and layers."""
        return ((self.config,) if self.config is not None else ()) + self.layers


def references(data: bytes) -> References:
    """The descriptors an index or image manifest names; ManifestError for anything else."""
    document = json_object(data)
    if document is None:
        raise ManifestError("not a JSON object")
    if "manifests" in document:
        entries = document["manifests"]
        if not isinstance(entries, list):
            raise ManifestError("index has no manifests list")
        return References(manifests=tuple(parse_descriptor(entry) for entry in entries))
    layers = document.get("layers")
    if "config" not in document or not isinstance(layers, list):
        raise ManifestError("neither an index nor an image manifest")
    return References(config=parse_descriptor(document["config"]), layers=tuple(parse_descriptor(d) for d in layers))


@dataclass(frozen=True)
class Visit:
    """One manifest or index met by `walk`: what it names, or why nothing (`found` None)."""

    digest: str
    found: References | None
    missing: bool = False  # `read` raised KeyError: the document is not stored
    problem: str | None = None  # stored, but not an index or image manifest


async def walk(roots: Iterable[str], read: Callable[[str], Awaitable[bytes]]) -> AsyncIterator[Visit]:
    """Every manifest and index reachable from `roots`, each once, with what it names.

    Only manifests are read (configs and layers are named, never read: a layer may be
    gigabytes). An absent or malformed document is a Visit without `found`, and the walk
    goes on: what to make of it is the caller's policy (the record cache rebuilds the
    image, gc marks nothing below it, the layout writer refuses). A caller that has seen
    enough leaves the loop.
    """
    pending, seen = list(roots), set()
    while pending:
        digest = pending.pop()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            data = await read(digest)
        except KeyError:
            yield Visit(digest, None, missing=True)
            continue
        try:
            found = references(data)
        except ManifestError as exc:
            yield Visit(digest, None, problem=str(exc))
            continue
        yield Visit(digest, found)
        pending.extend(child.digest for child in found.manifests)


def select_platform(entries: Sequence[Descriptor], wanted: OciPlatform) -> Descriptor | None:
    """The image manifest among an index's entries for `wanted`, None when there is none.

    os and architecture must be equal; a variant absent on either side matches (registries
    often omit `v8` for arm64, and Docker's User-Agent names none), and an exact variant
    beats an entry that merely omits it. Entries without a platform (attestations) and
    nested indexes are never chosen.
    """
    candidates = [
        entry for entry in entries
        if entry.media_type in MANIFEST_TYPES and entry.platform is not None
        and wanted.matches(entry.platform.os, entry.platform.architecture, entry.platform.variant)
    ]
    exact = [entry for entry in candidates if entry.platform and entry.platform.variant == wanted.variant]
    chosen = exact or candidates
    return chosen[0] if chosen else None


def platform_entries(entries: Sequence[Descriptor]) -> list[Descriptor]:
    """The entries that are one platform's image manifest, in the index's order."""
    return [entry for entry in entries if entry.media_type in MANIFEST_TYPES and entry.platform is not None]
