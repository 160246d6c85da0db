"""Conda packages to image layers, and what base layers hold. Knows conda and tarballs,
nothing of HTTP or OCI JSON (of OCI only the error an unreadable base layer raises).

A layer leaves this package as a `LayerBlob`: a gzip file on local disk plus the two
digests an image needs (the compressed blob digest and the uncompressed diff_id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from condery.layers.activation_scripts import PackageScripts


@dataclass(frozen=True)
class LayerBlob:
    digest: str  # "sha256:<hex>" of the gzip stream: the blob's address
    diff_id: str  # "sha256:<hex>" of the uncompressed tar: the image config's rootfs entry
    size: int  # bytes of the gzip stream
    path: Path  # local file holding the gzip stream until the store takes it
    # A package layer's part in activation, when the build read it from the archive in the
    # same pass (stream_layer.py); else None and the caller reads it from the archive.
    scripts: PackageScripts | None = None


class PackageError(ValueError):
    """A package cannot be turned into a layer: bad archive, bad hash, unsafe path.

    The message is shown to the registry's client, so it names the package and the
    reason, and never leaks a local path.
    """


class PackageUnavailable(PackageError):
    """The package could not be fetched right now (network, channel down): a passing
    fault, answered 503 rather than as a verdict on the package."""
