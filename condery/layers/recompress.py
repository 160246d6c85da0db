"""A layer recompressed to condery's own deterministic gzip.

A Docker schema 2 manifest can only describe gzip layers and every image is served in
both families, so an uncompressed or zstd base layer is recompressed once, with the
compressor of condery's own layers (compression.py): the same bytes on every host, so
every replica sharing a store serves the same digest.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from condery.layers.base_scan import STREAM_ERRORS
from condery.layers.compression import GzipChunkWriter, open_decompressed
from condery.oci.manifest import ManifestError


@dataclass(frozen=True)
class GzipBlob:
    digest: str  # sha256 of the gzip stream
    size: int
    diff_id: str  # sha256 of what the gzip stream decompresses to


def gzip_layer(source: Path, out_path: Path) -> GzipBlob:
    """Recompress the layer at `source` (tar, gzip or zstd) to deterministic gzip at
    `out_path`, with the compressor of condery's own layers (host-independent bytes).

    The digest and diff_id are read back from the written file, so the diff_id is that
    of the stream a client will unpack, not of what we meant to write.
    """
    with open(source, "rb") as handle, open(out_path, "wb") as raw:
        reader = open_decompressed(handle)
        packed = GzipChunkWriter(raw)  # type: ignore[arg-type]
        try:
            while chunk := reader.read(1 << 20):
                packed.write(chunk)
            packed.close()
        except STREAM_ERRORS as exc:
            packed.abort()
            if isinstance(exc, OSError) and exc.errno is not None:
                raise  # the work directory, not the stream
            raise ManifestError(f"layer is not a readable stream: {exc}") from None
        except BaseException:
            packed.abort()
            raise
    return _gzip_digests(out_path)


def _gzip_digests(path: Path) -> GzipBlob:
    compressed, uncompressed, size = hashlib.sha256(), hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            compressed.update(chunk)
            size += len(chunk)
        handle.seek(0)
        # Every gzip member: our layers are several (compression.py); bounded reads.
        with gzip.GzipFile(fileobj=handle, mode="rb") as inflated:
            while chunk := inflated.read(1 << 20):
                uncompressed.update(chunk)
    return GzipBlob("sha256:" + compressed.hexdigest(), size, "sha256:" + uncompressed.hexdigest())


