"""A group layer made of its packages' compressed layers, one after the other, not recompressed.

Every layer condery writes (layout v5) is: its directories, ending on a gzip member (zstd
frame) boundary; its other entries, ending on a boundary; the tar's end-of-archive blocks
in a last member of their own (tarball._LayerWriter, tarball.layer_order,
compression.end_part). A group layer is then:

    the union of its layers' directories, written once (compressed anew: a few KB)
    each layer's other members, in install order, their compressed bytes copied
    one end member

Readers see one tar: Go's compress/gzip (containerd, podman, skopeo, umoci) reads any
number of gzip members as one stream, zstd any number of frames. Each path is in the
group once: containers/storage (podman, CRI-O) refuses a layer that holds a path twice
("duplicates of file paths not supported"), directories included, and every package layer
carries its parents (`opt/`, `opt/conda/`, `opt/conda/lib/`...), which a group writes once
with the mode and owner the layers give them (the first layer's, as
tarball.concat_layers does). A group has the same tar (diff_id) as concat_layers gives it.

The layers are still read through (inflated, never deflated again): for the group's
diff_id, which is the sha256 of the whole tar, and to check them as concat_layers does:
every member name safe, a path a directory in one layer and anything else in another
refused, a hardlink whose target a later layer replaces refused. A file (or link) in two
layers makes the group NotConcatenable: concat_layers then keeps the last, as stacking does.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import queue
import tarfile
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence, Union

import zstandard

from condery.layers import LayerBlob, PackageError
from condery.layers.compression import GZIP, check_compression, compressing_writer
from condery.layers.tarball import _Entry, _member_entry, check_member_name, check_symlink, tar_info
from condery.layers.tarstream import TarReader, UnusualTar

_READ = 1 << 20
# zstd's decompressobj returns all it can: small inputs keep that bounded.
_ZSTD_READ = 16 << 10
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile's RECORDSIZE: archives are padded to a multiple of it
_END_MEMBER_MAX = 2 * _BLOCK + _RECORD  # the most a layer's end member holds (_end_blocks)

# A layer to read: a local file, or a file object the caller opened (a store's blob file).
LayerSource = Union[Path, BinaryIO]


# Below this mean (compressed) size a group's layers are recompressed together instead:
# each tiny layer's members compress alone, and 200 packages of 10 KB concatenated take
# 1.15x the bytes of one gzip -6 stream (1.08x recompressed), while recompressing that
# little costs a few hundred ms at most. From packages of ~200 KB up the bytes did not
# move (1.02x either way, docs/performance.md) and recompressing costs seconds (2.9 s for
# the 67 MB group of bench_scale's 100 MB x 300).
CONCAT_MIN_MEAN = 64 << 10


def worth_concatenating(sizes: Sequence[int]) -> bool:
    """Whether layers of these (compressed) sizes are grouped by concatenation."""
    return bool(sizes) and sum(sizes) >= CONCAT_MIN_MEAN * len(sizes)


class NotConcatenable(Exception):
    """A group that concat_layers must build instead: a path in two layers, or a layer not
    written as layout v5 describes (the message says which)."""


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)

    def tell(self) -> int:
        return 0


@dataclass(frozen=True)
class _Piece:
    start: int | None  # a member begins with this piece, at this offset of the source
    used: bytes  # compressed bytes, as the source holds them
    out: bytes  # what they inflate to


# Inflated bytes one call may return: a highly compressible stretch (a file of zeros)
# must not inflate 1 MiB of input into hundreds in one piece.
_MAX_PIECE = 4 << 20
_LEADING_PIECE = 16 << 10


def _pieces(source: BinaryIO, compression: str, max_piece: int | None = None) -> Iterator[_Piece]:
    """A layer's compressed members from where `source` stands, inflated piece by piece,
    at most `max_piece` bytes each: a reader that stops early inflates no more (blocking;
    no state shared with anything else, so it may run in a thread of its own)."""
    zstd = compression != GZIP
    max_piece = max_piece or _MAX_PIECE
    position = source.tell()
    pending = b""
    dobj: object | None = None
    while True:
        data, pending = (pending, b"") if pending else (source.read(_ZSTD_READ if zstd else _READ), b"")
        if not data:
            if dobj is not None:
                raise NotConcatenable("a layer ends inside a member")
            return
        start = None
        if dobj is None:
            start = position
            dobj = zstandard.ZstdDecompressor().decompressobj() if zstd else zlib.decompressobj(31)
        if zstd:  # zstd's decompressobj returns all it can (small inputs keep that bounded)
            out = dobj.decompress(data)  # type: ignore[attr-defined]
            rest = dobj.unused_data if dobj.eof else b""  # type: ignore[attr-defined]
            used = data[:len(data) - len(rest)] if rest else data
            if dobj.eof:  # type: ignore[attr-defined]
                dobj, pending = None, rest
            yield _Piece(start, used, out)
            position += len(used)
            continue
        # gzip: zlib's unconsumed tail gives the chunk's further pieces; the chunk's
        # compressed bytes go with its last one, once the member's end (if it is in the
        # chunk) says how many of them are this member's.
        out = dobj.decompress(data, max_piece)  # type: ignore[attr-defined]
        while tail := (b"" if dobj.eof else dobj.unconsumed_tail):  # type: ignore[attr-defined]
            yield _Piece(start, b"", out)
            start = None
            out = dobj.decompress(tail, max_piece)  # type: ignore[attr-defined]
        rest = dobj.unused_data if dobj.eof else b""  # type: ignore[attr-defined]
        used = data[:len(data) - len(rest)] if rest else data
        yield _Piece(start, used, out)
        position += len(used)
        if dobj.eof:  # type: ignore[attr-defined]
            dobj, pending = None, rest


class _Ahead:
    """Producers run in threads up to `layers` ahead of their consumer, each holding at
    most `depth` pieces: inflating (zlib and zstd let go of the GIL) the next layers of a
    group while the group's own thread hashes, copies and checks the current one. Closing
    it stops every producer."""

    _DONE = object()

    def __init__(self, producers: Sequence[Callable[[], Iterator[_Piece]]], layers: int = 2, depth: int = 4) -> None:
        self._producers, self._layers, self._depth = producers, layers, depth
        self._queues: dict[int, queue.Queue] = {}
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=layers, thread_name_prefix="condery-inflate")
        self._next = 0

    def _put(self, sink: queue.Queue, item: object) -> bool:
        """Hand `item` on once there is room; False if the consumer closed meanwhile."""
        while not self._stop.is_set():
            try:
                sink.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, index: int, sink: queue.Queue) -> None:
        try:
            for piece in self._producers[index]():
                if not self._put(sink, piece):
                    return
            item: object = self._DONE
        except BaseException as exc:  # handed to the consumer, raised there
            item = exc
        self._put(sink, item)

    def _launch_until(self, index: int) -> None:
        while self._next < len(self._producers) and self._next <= index + self._layers - 1:
            sink: queue.Queue = queue.Queue(self._depth)
            self._queues[self._next] = sink
            self._pool.submit(self._run, self._next, sink)
            self._next += 1

    def pieces(self, index: int) -> Iterator[_Piece]:
        """Producer `index`'s pieces, in order (consumers take the producers in order)."""
        self._launch_until(index)
        sink = self._queues.pop(index)
        while True:
            item = sink.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Parts:
    """Reads one layer's members (frames) in order, inflated, for a tar reader, while the
    compressed bytes go to `out` and both hashes follow. Before each member starts, the
    positions and the hashes are noted (`starts`, `mark`), so that a member's place is
    known and the last member can be taken back."""

    def __init__(self, pieces: Iterator[_Piece], out: BinaryIO | _Null,
                 digest: "hashlib._Hash | None" = None, diff: "hashlib._Hash | None" = None) -> None:
        self._pieces = pieces
        self._out, self._digest, self._diff = out, digest, diff
        # Inflated bytes not read yet: whole pieces (deleting from the front of one buffer
        # moved all the rest, for every 10 KB tarfile read).
        self._chunks: collections.deque[memoryview] = collections.deque()
        self._buffered = 0
        self._done = False
        self.consumed = 0  # inflated bytes read or skipped
        self.entries_end: int | None = None  # set by _layer_entries
        self.uncompressed = 0
        self.starts: dict[int, int] = {}  # uncompressed offset -> source offset of a member starting there
        self.mark: tuple[int, int, object, object] | None = None  # out position, uncompressed, hashes
        self.part_zero = True
        self.part_size = 0

    def _start(self, position: int) -> None:
        self.starts[self.uncompressed] = position
        self.mark = (self._out.tell(), self.uncompressed,
                     self._digest.copy() if self._digest else None, self._diff.copy() if self._diff else None)
        self.part_zero, self.part_size = True, 0

    def _pump(self) -> None:
        piece = next(self._pieces, None)
        if piece is None:
            self._done = True
            return
        if piece.start is not None:
            self._start(piece.start)
        if piece.used:
            self._out.write(piece.used)
            if self._digest is not None:
                self._digest.update(piece.used)
        out = piece.out
        if out:
            if self._diff is not None:
                self._diff.update(out)
            self.uncompressed += len(out)
            self.part_size += len(out)
            # Only an end member (a few KB) is asked whether it is all zeros: counting the
            # zeros of every inflated byte was 4 % of a group's time.
            if self.part_zero and (self.part_size > _END_MEMBER_MAX or out.count(0) != len(out)):
                self.part_zero = False
            self._chunks.append(memoryview(out))
            self._buffered += len(out)

    def _take(self, n: int, keep: bool) -> tuple[list[memoryview], int]:
        """The next `n` inflated bytes (fewer at the end): as pieces if `keep`, and how many."""
        while not self._done and self._buffered < n:
            self._pump()
        taken: list[memoryview] = []
        left = n
        while left and self._chunks:
            chunk = self._chunks[0]
            if len(chunk) <= left:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[left:]
                chunk = chunk[:left]
            if keep:
                taken.append(chunk)
            left -= len(chunk)
        self._buffered -= n - left
        self.consumed += n - left
        return taken, n - left

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            while not self._done:
                self._pump()
            n = self._buffered
        return b"".join(self._take(n, keep=True)[0])

    def skip(self, n: int) -> None:
        """Pass over `n` inflated bytes, or all that is left (still copied and hashed)."""
        while n > 0:
            got = self._take(min(n, _MAX_PIECE), keep=False)[1]
            if not got:
                return
            n -= got


def _layer_entries(parts: _Parts) -> Iterator[tuple[str, str, str]]:
    """(name, kind, link target) of each entry of one of condery's own layers, from their
    headers (tarstream.py: contents skipped, not read), checked as tarball._member_entry
    checks what tarfile reads; then parts.entries_end is where the end-of-archive blocks
    start. A tar feature condery does not write is NotConcatenable: concat_layers, which
    reads with tarfile, builds the group."""
    reader = TarReader(parts)
    try:
        for entry in reader.entries():
            if entry.kind == "symlink":
                check_symlink(entry.name, entry.linkname)
            elif entry.kind == "hardlink":
                check_member_name(entry.linkname)
            check_member_name(entry.name)
            yield entry.name, entry.kind, entry.linkname
    except UnusualTar as exc:
        raise NotConcatenable(str(exc)) from None
    parts.entries_end = reader.end


def _end_blocks(size: int) -> bytes:
    """What tarfile writes after the entries of an archive of `size` bytes: two zero
    blocks, then zeros up to a multiple of its record size."""
    total = size + 2 * _BLOCK
    return bytes(2 * _BLOCK + (-total) % _RECORD)


@contextlib.contextmanager
def _opened(source: LayerSource) -> Iterator[BinaryIO]:
    if isinstance(source, Path):
        with open(source, "rb") as handle:
            yield handle
    else:
        source.seek(0)
        yield source


def _leading_dirs(handle: BinaryIO, compression: str) -> tuple[list[_Entry], int]:
    """A layer's directories, and where (in its compressed bytes) the member holding its
    first other entry begins; only its first members are inflated."""
    # Small pieces: only the directories' member(s) and the first header after them are
    # read, not the first MiB of the layer's files.
    parts = _Parts(_pieces(handle, compression, max_piece=_LEADING_PIECE), _Null())
    dirs: list[_Entry] = []
    try:
        with tarfile.open(fileobj=parts, mode="r|") as tar:  # type: ignore[call-overload]
            first_other = None
            for member in tar:
                entry = _member_entry(member)
                if entry.kind != "dir":
                    first_other = member.offset
                    break
                dirs.append(entry)
            if first_other is None:
                first_other = tar.offset  # directories only: the next member is the end member
    except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise NotConcatenable(f"unreadable layer ({type(exc).__name__})") from None
    start = parts.starts.get(first_other)
    if start is None:
        raise NotConcatenable("a layer whose directories do not end on a member boundary")
    return dirs, start


def _dirs_part(dirs: Sequence[_Entry], compression: str) -> tuple[bytes, bytes]:
    """The tar entries of `dirs` and their compressed member(s), as a layer writes them."""
    tar_bytes = io.BytesIO()
    tar = tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]
    for entry in dirs:
        tar.addfile(tar_info(entry))
    data = tar_bytes.getvalue()  # before close(), which would add the end blocks
    if not data:
        return b"", b""
    return data, compress_part(data, compression)


def compress_part(data: bytes, compression: str) -> bytes:
    """`data` as a layer writer compresses a part of its stream (chunked gzip members, or
    one zstd frame), ended on a member boundary."""
    sink = io.BytesIO()
    writer = compressing_writer(compression, sink)  # type: ignore[arg-type]
    writer.write(data)
    writer.end_part()
    if compression == GZIP:
        writer.close()  # writes the members in flight; a zstd close would add an empty frame
    return sink.getvalue()


def concat_compressed(layers: Sequence[LayerSource], out_path: Path, compression: str = GZIP) -> LayerBlob:
    """One layer holding the layers' entries in order, their compressed bytes copied.

    Raises PackageError for a group that cannot be one layer (see the module doc), and
    NotConcatenable where tarball.concat_layers must build it (a file in two layers, a
    layer not of layout v5).
    """
    check_compression(compression)
    dirs: dict[str, _Entry] = {}
    starts = []
    for layer in layers:
        with _opened(layer) as handle:
            found, start = _leading_dirs(handle, compression)
        for entry in found:
            dirs.setdefault(entry.name, entry)
        starts.append(start)
    digest, diff = hashlib.sha256(), hashlib.sha256()
    final: dict[str, int] = {}  # path -> the layer holding it
    links: list[tuple[int, str, str]] = []

    def producer(li: int) -> Callable[[], Iterator[_Piece]]:
        def run() -> Iterator[_Piece]:
            with _opened(layers[li]) as source:
                source.seek(starts[li])
                yield from _pieces(source, compression)
        return run

    ahead = _Ahead([producer(li) for li in range(len(layers))])
    try:
        with open(out_path, "wb") as out:
            head_tar, head = _dirs_part([dirs[name] for name in sorted(dirs)], compression)
            out.write(head)
            digest.update(head)
            diff.update(head_tar)
            total = len(head_tar)
            for li in range(len(layers)):
                parts = _Parts(ahead.pieces(li), out, digest, diff)
                try:
                    for name, kind, linkname in _layer_entries(parts):
                        if kind == "dir":
                            raise NotConcatenable(f"the directory {name!r} after other entries "
                                                  "(a layer before layout v5)")
                        if name in dirs:
                            raise PackageError(f"{name!r} is a dir in one layer and a {kind} in another")
                        if name in final:
                            raise NotConcatenable(f"{name!r} is in two layers (podman refuses "
                                                  "a path twice in one layer)")
                        final[name] = li
                        if kind == "hardlink":
                            links.append((li, name, linkname))
                    entries_end = parts.entries_end
                    parts.skip(1 << 62)  # the rest: the end blocks' member
                except (zlib.error, zstandard.ZstdError) as exc:
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
                if final.get(target, li) != li:
                    raise PackageError(f"the hardlink {name!r} points at a file another layer replaces")
            end = _end_blocks(total)
            tail = compress_part(end, compression)
            out.write(tail)
            digest.update(tail)
            diff.update(end)
            size = out.tell()
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    finally:
        ahead.close()
    return LayerBlob(digest="sha256:" + digest.hexdigest(), diff_id="sha256:" + diff.hexdigest(),
                     size=size, path=out_path)
