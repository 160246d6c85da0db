"""The layer compressor: host-independent bytes, the same for any thread count, readable by every client.

The golden digests below were recorded once; they must hold on any machine whatever
zlib (or zlib-ng) its Python links, because layers are written by the pinned libdeflate
and zstandard wheels. If one changes on purpose (a new pinned version, another level or
chunk size), bump LAYOUT_VERSION in condery/layers/package_layer.py with it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from condery.layers.compression import (
    CHUNK_SIZE, COMPRESSOR_ID, GZIP, ZSTD, GzipChunkWriter, gzip_chunk, open_decompressed,
)
from condery.layers.tarball import concat_layers, write_layer
from condery.layers.recompress import gzip_layer

# Layout v5 (LAYOUT_VERSION): directories first, in a member of their own.
GOLDEN = {
    GZIP: "sha256:737f000efec60d6b70860752e2e8fd3035302927982f812d7e623f5ea18a334f",
    ZSTD: "sha256:28d9353d0b684f948cbc71cce17ff5bc57e4adf6d1034170e3a7fa9f380d3705",
}
GOLDEN_DIFF_ID = "sha256:16deb606ba56550e0aa31ff8b1362c55c1fcca1cf386536a1963dcb0f65e65da"


def golden_tree(root: Path) -> Path:
    """~3.9 MiB of fixed files, some text-like, some incompressible: several chunks."""
    (root / "lib").mkdir(parents=True)
    (root / "share" / "doc").mkdir(parents=True)
    lines = "".join(f"{i:06d} {hashlib.sha256(str(i % 997).encode()).hexdigest()} value={i * 7}\n"
                    for i in range(30_000))
    (root / "share" / "doc" / "table.txt").write_text(lines)
    noise = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(40_000))  # 1.25 MiB
    (root / "lib" / "libnoise.so").write_bytes(noise)
    (root / "lib" / "libnoise.so").chmod(0o755)
    (root / "empty.txt").write_bytes(b"")
    return root


def entries_end(tar: bytes) -> int:
    """Where a tar's entries end and its end-of-archive blocks begin."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r|") as archive:
        for _ in archive:
            pass
        return archive.offset


def dirs_end(tar: bytes) -> int:
    """Where a layer's directories end (its first other entry begins): a member boundary."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r|") as archive:
        for member in archive:
            if not member.isdir():
                return member.offset
        return archive.offset


def members_of(data: bytes) -> list[bytes]:
    """Split a gzip stream into its members, each checked to decompress on its own."""
    out, rest = [], data
    while rest:
        inflate = zlib.decompressobj(31)
        inflate.decompress(rest)
        assert inflate.eof
        size = len(rest) - len(inflate.unused_data)
        out.append(rest[:size])
        rest = inflate.unused_data
    return out


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_golden_layer_digest(tmp_path: Path, compression: str) -> None:
    blob = write_layer(golden_tree(tmp_path / "tree"), "opt/conda", tmp_path / "layer", compression=compression)
    assert blob.diff_id == GOLDEN_DIFF_ID
    assert blob.digest == GOLDEN[compression], COMPRESSOR_ID[compression]


def test_layer_bytes_never_come_from_the_hosts_zlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever zlib (or zlib-ng) Python links, it writes no layer byte: with its
    compressors out of reach the golden digest still comes out."""
    def refuse(*args, **kwargs):
        raise AssertionError("the host's zlib compressed layer bytes")

    for name in ("compress", "compressobj"):
        monkeypatch.setattr(zlib, name, refuse)
    blob = write_layer(golden_tree(tmp_path / "tree"), "opt/conda", tmp_path / "layer.tgz")
    assert blob.digest == GOLDEN[GZIP]


def test_bytes_do_not_depend_on_thread_count(tmp_path: Path) -> None:
    blob = write_layer(golden_tree(tmp_path / "tree"), "opt/conda", tmp_path / "layer.tgz")
    tar = gzip.decompress(blob.path.read_bytes())
    end, dirs = entries_end(tar), dirs_end(tar)
    assert len(tar) > 3 * CHUNK_SIZE and 0 < dirs < end
    for threads in (1, 2, 5):
        for window in (1, 8):
            out = io.BytesIO()
            with ThreadPoolExecutor(threads) as pool:
                writer = GzipChunkWriter(out, pool, window)
                writer.write(tar[:dirs])
                writer.end_part()
                for i in range(dirs, end, 12345):  # write sizes unrelated to the chunk size
                    writer.write(tar[i:min(i + 12345, end)])
                writer.end_part()
                writer.write(tar[end:])
                writer.close()
            assert "sha256:" + hashlib.sha256(out.getvalue()).hexdigest() == blob.digest, (threads, window)


def test_memory_stays_a_few_chunks_whatever_the_layer_size() -> None:
    """32 MiB through the writer: it holds its window of chunks, never the layer."""
    class Counting:
        size = 0

        def write(self, data: bytes) -> int:
            self.size += len(data)
            return len(data)

    piece = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2048))  # 64 KiB
    sink = Counting()
    tracemalloc.start()
    try:
        with ThreadPoolExecutor(2) as pool:
            writer = GzipChunkWriter(sink, pool)  # type: ignore[arg-type]
            for _ in range(512):
                writer.write(piece)
            writer.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.size > 32 * CHUNK_SIZE * 0.9  # incompressible: the bytes really went through
    # At most window + 1 (4) chunks in flight, in and out, plus the buffer and the slice
    # cut from it: ~10 MiB (8 seen), against 36 MiB with a window of 64 and 32 for the layer.
    assert peak < 12 * CHUNK_SIZE, peak


def test_members_are_fixed_chunks_every_gzip_reader_takes(tmp_path: Path) -> None:
    blob = write_layer(golden_tree(tmp_path / "tree"), "opt/conda", tmp_path / "layer.tgz")
    data = blob.path.read_bytes()
    tar = gzip.decompress(data)
    end, dirs = entries_end(tar), dirs_end(tar)
    members = members_of(data)
    # The directories in a member of their own (a group writes them once: concat.py), the
    # other entries in fixed chunks, then the end-of-archive blocks in a member of their own.
    assert 0 < dirs < CHUNK_SIZE and members[0] == gzip_chunk(tar[:dirs])
    assert len(members) == 1 + -(-(end - dirs) // CHUNK_SIZE) + 1
    for i, member in enumerate(members[1:-1]):
        assert member == gzip_chunk(tar[dirs + i * CHUNK_SIZE:min(dirs + (i + 1) * CHUNK_SIZE, end)])
    for member in members:
        assert member[3] == 0 and member[4:8] == b"\0\0\0\0"  # no name, no time
    assert members[-1] == gzip_chunk(tar[end:]) and tar[end:] == bytes(len(tar) - end) and len(tar) % 10240 == 0
    # GNU gzip and tarfile's file mode read all members; so does Go (the e2e test's skopeo).
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-dc", str(blob.path)], capture_output=True, check=True).stdout == tar
    with tarfile.open(blob.path, "r:gz") as archive:
        assert archive.getmember("opt/conda/lib/libnoise.so").size == 40_000 * 32


def test_empty_stream_is_one_member() -> None:
    out = io.BytesIO()
    writer = GzipChunkWriter(out)
    writer.close()
    assert gzip.decompress(out.getvalue()) == b"" and len(members_of(out.getvalue())) == 1


def test_zstd_layer_is_one_frame_without_content_size(tmp_path: Path) -> None:
    blob = write_layer(golden_tree(tmp_path / "tree"), "opt/conda", tmp_path / "layer.zst", compression=ZSTD)
    data = blob.path.read_bytes()
    params = zstandard.get_frame_parameters(data)
    assert params.content_size == zstandard.CONTENTSIZE_UNKNOWN and params.dict_id == 0
    tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    assert "sha256:" + hashlib.sha256(tar).hexdigest() == blob.diff_id


def test_unknown_compression_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown layer compression"):
        write_layer(golden_tree(tmp_path / "tree"), "", tmp_path / "x", compression="xz")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("compression", [GZIP, ZSTD])
def test_concat_reads_every_chunk(tmp_path: Path, compression: str) -> None:
    """Grouped layers read their members back whole (tarfile's own "r|gz" stops at the first member)."""
    first = write_layer(golden_tree(tmp_path / "a"), "opt/conda", tmp_path / "a.layer", compression=compression)
    (tmp_path / "b" / "lib").mkdir(parents=True)
    (tmp_path / "b" / "lib" / "other").write_bytes(b"x" * 10)
    second = write_layer(tmp_path / "b", "opt/conda", tmp_path / "b.layer", compression=compression)
    group = concat_layers([first.path, second.path], tmp_path / "group.layer", compression)
    with open(group.path, "rb") as handle:
        with open_decompressed(handle) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            sizes = {m.name: m.size for m in tar}
    assert sizes["opt/conda/lib/libnoise.so"] == 40_000 * 32 and sizes["opt/conda/lib/other"] == 10
    assert sizes["opt/conda/share/doc/table.txt"] == (tmp_path / "a/share/doc/table.txt").stat().st_size


def test_base_layer_recompression_uses_the_layer_compressor(tmp_path: Path) -> None:
    """A zstd base layer becomes the same gzip bytes condery's own writer gives that tar
    (fixed chunks through the whole stream: a base layer's end blocks are not cut off)."""
    ours = write_layer(golden_tree(tmp_path / "tree"), "opt/conda", tmp_path / "layer.tgz")
    zst = write_layer(tmp_path / "tree", "opt/conda", tmp_path / "layer.zst", compression=ZSTD)
    blob = gzip_layer(zst.path, tmp_path / "regzipped")
    tar = gzip.decompress(ours.path.read_bytes())
    expected = io.BytesIO()
    writer = GzipChunkWriter(expected)
    writer.write(tar)
    writer.close()
    assert blob.diff_id == ours.diff_id
    assert (blob.digest, blob.size) == ("sha256:" + hashlib.sha256(expected.getvalue()).hexdigest(),
                                        len(expected.getvalue()))
