"""A group layer made of its packages' compressed layers, one after the other, not recompressed.

Every layer condery writes ends its entries on a gzip member (zstd frame) boundary and
keeps the tar's end-of-archive blocks in a last member of their own (tarball._LayerWriter,
compression.end_part). A group layer is then each package layer's bytes without that last
member, in install order, then one end member: the compressed bytes are copied, never
recompressed. Readers see one tar: Go's compress/gzip (containerd, podman, skopeo, umoci)
reads any number of gzip members as one stream and zstd any number of frames.

The layers are still read through (inflated, never deflated again): for the group's
diff_id, which is the sha256 of the whole tar, and to check them as tarball.concat_layers
does: every member name safe, a path a directory in one layer and anything else in
another refused, a hardlink whose target a later layer replaces refused.

A path may not repeat: containers/storage (podman, CRI-O) refuses a layer that holds one
path twice ("duplicates of file paths not supported"), directories included, although Go's
tar readers, containerd and umoci accept it. Package layers each carry their parent
directories (`opt/`, `opt/conda/`, ...), so such a group is NotConcatenable and the caller
recompresses it (tarball.concat_layers keeps one entry a path). Copying pays off once
package layers leave shared parents out; until then it serves groups that share no path.
"""

from __future__ import annotations

import hashlib
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Sequence

import zstandard

from condery.layers import LayerBlob, PackageError
from condery.layers.compression import GZIP, check_compression, gzip_chunk, zstd_compressor
from condery.layers.tarball import _member_entry

_READ = 1 << 20
# zstd's decompressobj returns all it can: small inputs keep that bounded.
_ZSTD_READ = 16 << 10
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile's RECORDSIZE: archives are padded to a multiple of it


class NotConcatenable(Exception):
    """A layer that does not end in an end-of-archive member (written before layout v4)."""


class _Parts:
    """Reads one layer's members (frames) in order, inflating them for a tar reader, while
    the compressed bytes go to `out` and both hashes follow. Before each member starts, the
    position and the hashes are noted, so that the last member can be taken back."""

    def __init__(self, source: BinaryIO, compression: str, out: BinaryIO,
                 digest: "hashlib._Hash", diff: "hashlib._Hash") -> None:
        self._source, self._zstd = source, compression != GZIP
        self._out, self._digest, self._diff = out, digest, diff
        self._pending = b""
        self._dobj: object | None = None
        self._buffer = bytearray()
        self._done = False
        self.uncompressed = 0
        self.mark: tuple[int, int, object, object] | None = None  # out position, uncompressed, hashes
        self.part_zero = True
        self.part_size = 0

    def _start(self) -> None:
        self.mark = (self._out.tell(), self.uncompressed, self._digest.copy(), self._diff.copy())
        self.part_zero, self.part_size = True, 0
        self._dobj = (zstandard.ZstdDecompressor().decompressobj() if self._zstd
                      else zlib.decompressobj(31))

    def _pump(self) -> None:
        data = self._pending or self._source.read(_ZSTD_READ if self._zstd else _READ)
        self._pending = b""
        if not data:
            if self._dobj is not None:
                raise NotConcatenable("a layer ends inside a member")
            self._done = True
            return
        if self._dobj is None:
            self._start()
        dobj = self._dobj
        out = dobj.decompress(data)  # type: ignore[attr-defined]
        used = data
        if dobj.eof:  # type: ignore[attr-defined]
            rest = dobj.unused_data  # type: ignore[attr-defined]
            if rest:
                used = data[:len(data) - len(rest)]
                self._pending = rest
            self._dobj = None
        self._out.write(used)
        self._digest.update(used)
        if out:
            self._diff.update(out)
            self.uncompressed += len(out)
            self.part_size += len(out)
            if self.part_zero and out.count(0) != len(out):
                self.part_zero = False
            self._buffer += out

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buffer) < n):
            self._pump()
        if n < 0:
            n = len(self._buffer)
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data


def _end_blocks(size: int) -> bytes:
    """What tarfile writes after the entries of an archive of `size` bytes: two zero
    blocks, then zeros up to a multiple of its record size."""
    total = size + 2 * _BLOCK
    return bytes(2 * _BLOCK + (-total) % _RECORD)


def concat_compressed(layers: Sequence[Path], out_path: Path, compression: str = GZIP) -> LayerBlob:
    """One layer holding the layers' entries in order, their compressed bytes copied.

    Raises PackageError for a group that cannot be one layer (see the module doc), and
    NotConcatenable for a layer not written with its end blocks in a member of their own
    (the caller then uses tarball.concat_layers).
    """
    check_compression(compression)
    digest, diff = hashlib.sha256(), hashlib.sha256()
    kinds: dict[str, str] = {}
    final: dict[str, int] = {}  # path -> the layer whose entry for it is unpacked last
    links: list[tuple[int, str, str]] = []
    total = 0
    try:
        with open(out_path, "wb") as out:
            for li, layer in enumerate(layers):
                with open(layer, "rb") as source:
                    parts = _Parts(source, compression, out, digest, diff)
                    try:
                        with tarfile.open(fileobj=parts, mode="r|") as tar:  # type: ignore[call-overload]
                            for member in tar:
                                entry = _member_entry(member)
                                seen = kinds.get(entry.name)
                                if seen is not None and (seen == "dir") != (entry.kind == "dir"):
                                    raise PackageError(f"{entry.name!r} is a {seen} in one layer "
                                                       f"and a {entry.kind} in another")
                                if seen is not None:
                                    raise NotConcatenable(f"{entry.name!r} is in two layers (podman refuses "
                                                          "a path twice in one layer)")
                                kinds[entry.name] = entry.kind
                                if entry.kind != "dir":
                                    final[entry.name] = li
                                if entry.kind == "hardlink":
                                    links.append((li, entry.name, entry.linkname))
                            entries_end = tar.offset
                        parts.read()  # the rest: the end blocks' member
                    except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as exc:
                        raise NotConcatenable(f"unreadable layer ({type(exc).__name__})") from None
                    if parts.mark is None or not parts.part_zero or parts.part_size < 2 * _BLOCK:
                        raise NotConcatenable("a layer without an end member")
                    position, uncompressed, kept_digest, kept_diff = parts.mark
                    if uncompressed != entries_end:
                        raise NotConcatenable("a layer whose entries do not end on a member boundary")
                    # Take the end member back: the next layer's entries follow.
                    out.seek(position)
                    out.truncate()
                    digest, diff = kept_digest, kept_diff  # type: ignore[assignment]
                    total += uncompressed
            for li, name, target in links:
                if final.get(name) == li and final.get(target, li) != li:
                    raise PackageError(f"the hardlink {name!r} points at a file another layer replaces")
            end = _end_blocks(total)
            tail = gzip_chunk(end) if compression == GZIP else zstd_compressor().compress(end)
            out.write(tail)
            digest.update(tail)
            diff.update(end)
            size = out.tell()
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    return LayerBlob(digest="sha256:" + digest.hexdigest(), diff_id="sha256:" + diff.hexdigest(),
                     size=size, path=out_path)
