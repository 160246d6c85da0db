"""Layer compression: the same bytes on every host, and more than one core per layer.

gzip layers are compressed with libdeflate (the `deflate` wheel, pinned exactly in
pyproject.toml), never with the zlib the host's Python links: zlib and zlib-ng give
other bytes for the same input, and a layer's digest must not depend on the host. The
tar stream is cut into fixed CHUNK_SIZE pieces, each compressed on its own into one
gzip member (RFC 1952 allows any number of members; Go's compress/gzip, and so
containerd, Docker, skopeo, umoci and podman, reads them as one stream, as do Python's
gzip module and GNU gzip). The cut points depend on the input only, so the output is
the same whatever the number of threads or the order in which they finish.

libdeflate has no streaming interface, so pigz's single-member layout (raw deflate
blocks joined by sync flushes) is out of reach; independent 1 MiB members cost ~0.1% of
size against one stream (docs/performance.md measures it).

Chunks go to ONE process-wide pool of os.cpu_count() threads (libdeflate releases the
GIL). Package layers are written in layer worker processes (layers/workers.py), one
per core, each with such a pool: one large package alone still compresses on every
core, several at once share them. Each layer keeps at most `workers + 1` chunks in
flight, so a layer's memory stays a few MiB whatever its size.

zstd layers (layer_compression: zstd) use the zstandard wheel (pinned) at a fixed level,
single-threaded: zstd's own worker threads give other bytes than its single-threaded
mode (and thread-count-independent bytes only when streaming), and level 3 on one core
already outruns the tar stream that feeds it. No dictionary, no content size in the
frame header (the size of a stream is unknown when it starts), no checksum (the layer's
digest covers it).
"""

from __future__ import annotations

import gzip
import os
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import IO, BinaryIO

import deflate
import zstandard

GZIP = "gzip"
ZSTD = "zstd"
COMPRESSIONS = (GZIP, ZSTD)

# Chosen by measurement (bench/bench_compressors.py, docs/performance.md): on real
# package content libdeflate level 4 gives 1.017x the bytes of zlib -6 at ~5.5x its
# speed on one core; level 3 is 1.024x (too close to the 1.03x budget), level 5 0.995x
# but 13-23% slower. 1 MiB chunks cost 0.1% against 4 MiB ones and let a 3 MiB layer
# use three threads; at 256 KiB the loss is 0.5%.
DEFLATE_LEVEL = 4
CHUNK_SIZE = 1 << 20
# Parts smaller than this are compressed by the writing thread itself (GzipChunkWriter).
INLINE_CHUNK = 64 << 10
ZSTD_LEVEL = 3
# Part of every layer cache key: a change here changes layer bytes (see cache.layer_key).
# "-e": a layer's tar end blocks are a gzip member (zstd frame) of their own (end_part).
COMPRESSOR_ID = {
    GZIP: f"libdeflate-{deflate.__version__}-l{DEFLATE_LEVEL}-c{CHUNK_SIZE}-e",
    ZSTD: f"zstd-{'.'.join(map(str, zstandard.ZSTD_VERSION))}-l{ZSTD_LEVEL}-e",
}

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def compressor_pool() -> ThreadPoolExecutor:
    """The process-wide chunk compression pool, one thread per core.

    Process-wide rather than per AppState: it stands for the machine's cores, which
    every app in the process (tests run several) shares anyway.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="condery-deflate")
        return _pool


def gzip_chunk(data: bytes) -> bytes:
    """One gzip member of `data`: libdeflate at DEFLATE_LEVEL, mtime 0, no name, OS 255."""
    return bytes(deflate.gzip_compress(data, DEFLATE_LEVEL))


class GzipChunkWriter:
    """A write-only file object: what is written leaves as CHUNK_SIZE gzip members, in order.

    Chunks are compressed on `executor` (the process-wide pool unless given: tests pass
    pools of other sizes to show the bytes do not change), at most `window` at a time.
    """

    def __init__(self, sink: BinaryIO, executor: Executor | None = None, window: int | None = None) -> None:
        self._sink = sink
        self._executor = executor if executor is not None else compressor_pool()
        workers = getattr(self._executor, "_max_workers", os.cpu_count() or 2)
        self._window = window or workers + 1
        self._buffer = bytearray()
        self._pending: deque[Future[bytes]] = deque()
        self._wrote_any = False

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            chunk = bytes(self._buffer[:CHUNK_SIZE])
            del self._buffer[:CHUNK_SIZE]
            self._submit(chunk)
        return len(data)

    def _submit(self, chunk: bytes) -> None:
        if len(chunk) < INLINE_CHUNK:
            # A small part (a small layer, its directories, its end blocks): compressed here.
            # Handing it to the pool and waiting for it cost more than compressing it. The
            # same bytes either way, in the same order.
            done: Future[bytes] = Future()
            done.set_result(gzip_chunk(chunk))
            self._pending.append(done)
        else:
            self._pending.append(self._executor.submit(gzip_chunk, chunk))
        self._wrote_any = True
        while len(self._pending) > self._window:
            self._sink.write(self._pending.popleft().result())

    def flush(self) -> None:
        pass  # members are written whole; a partial chunk waits for close()

    def end_part(self) -> None:
        """End the current member here, whatever its length: what follows starts a new one
        (a layer's tar end blocks, so that layers concatenate: concat.py)."""
        if self._buffer:
            self._submit(bytes(self._buffer))
            self._buffer.clear()

    def close(self) -> None:
        if self._buffer or not self._wrote_any:  # an empty stream is still one (empty) member
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while self._pending:
            self._sink.write(self._pending.popleft().result())

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._buffer.clear()


class ZstdWriter:
    """A write-only file object compressing to one zstd frame (ZSTD_LEVEL, one thread)."""

    def __init__(self, sink: BinaryIO) -> None:
        self._stream = zstd_compressor().stream_writer(sink, closefd=False)
        self._in_frame = False

    def write(self, data: bytes) -> int:
        self._stream.write(data)
        self._in_frame = self._in_frame or bool(data)
        return len(data)

    def flush(self) -> None:
        pass  # a zstd flush would end a block early and change the bytes

    def end_part(self) -> None:
        """End the current frame here: what follows is a new frame (see GzipChunkWriter)."""
        if self._in_frame:
            self._stream.flush(zstandard.FLUSH_FRAME)
            self._in_frame = False

    def close(self) -> None:
        self._stream.close()

    def abort(self) -> None:
        self._stream.close()


def zstd_compressor() -> zstandard.ZstdCompressor:
    """The one zstd configuration of layers (see the module docstring)."""
    return zstandard.ZstdCompressor(
        level=ZSTD_LEVEL, threads=0, write_content_size=False, write_checksum=False, write_dict_id=False,
    )


def check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown layer compression {compression!r} (one of {', '.join(COMPRESSIONS)})")


def compressing_writer(compression: str, sink: BinaryIO) -> GzipChunkWriter | ZstdWriter:
    check_compression(compression)
    return GzipChunkWriter(sink) if compression == GZIP else ZstdWriter(sink)


def open_decompressed(handle: IO[bytes]) -> IO[bytes]:
    """A reader of the tar inside a gzip (any number of members), zstd (any number of
    frames) or uncompressed layer, chosen by its magic bytes; `handle` must be seekable."""
    magic = handle.read(4)
    handle.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[return-value]
    if magic == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)  # type: ignore[return-value]
    return handle
