"""Benchmark: deflate implementations on real package content, beside zlib -6.

    python3 bench/bench_compressors.py [--max-mb 0] [--repeat 3]
    (pip install isal zlib-ng to include them; deflate and zstandard are dependencies)

The content is what condery compresses: each package of the shared fixture channel
(anaconda-main-2020) and the test suite's python package, installed into a directory
and written by condery's own tar writer (condery/layers/tarball.py), so the tar streams
are byte for byte those of real layers. Prints, per implementation and level, the speed
on one core (MB of tar per second, best of --repeat) and the compressed size against
zlib -6 (what Python's gzip module, and so condery before, wrote); then libdeflate at
the chosen level cut into chunks of several sizes; then condery's GzipChunkWriter on
1..cpu_count threads beside `pigz -6` and `gzip -6`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import deflate
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from condery.layers.compression import CHUNK_SIZE, DEFLATE_LEVEL, ZSTD, GzipChunkWriter  # noqa: E402
from condery.layers.tarball import write_layer  # noqa: E402
from tests.fixtures.python_package import python_package  # noqa: E402

FIXTURES = Path("/work/shared/fixtures/anaconda-main-2020")
MB = 1e6


def package_tars(work: Path, max_bytes: int) -> list[tuple[str, bytes]]:
    """(name, condery's uncompressed layer tar) of each fixture package, largest first."""
    archives = sorted(FIXTURES.rglob("*.conda")) + [python_package()]
    out: list[tuple[str, bytes]] = []
    for archive in archives:
        tree = work / archive.name
        tree.mkdir()  # a package may have no files (_libgcc_mutex)
        with zipfile.ZipFile(archive) as zf:
            (pkg,) = [n for n in zf.namelist() if n.startswith("pkg-")]
            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(zf.read(pkg)), read_across_frames=True)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                tar.extractall(tree, filter="data")
        layer = write_layer(tree, "opt/conda", work / f"{archive.name}.zst", compression=ZSTD)
        data = zstandard.ZstdDecompressor().stream_reader(open(layer.path, "rb"), read_across_frames=True).read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.diff_id
        out.append((archive.name, data))
        shutil.rmtree(tree)
    out.sort(key=lambda item: -len(item[1]))
    if max_bytes:
        kept, total = [], 0
        for item in out:
            if total + len(item[1]) <= max_bytes or not kept:
                kept.append(item)
                total += len(item[1])
        out = kept
    return out


def zlib_like(module, level: int) -> Callable[[bytes], int]:
    def run(data: bytes) -> int:
        packer = module.compressobj(level, module.DEFLATED, 31)
        return len(packer.compress(data)) + len(packer.flush())
    return run


def candidates() -> dict[str, Callable[[bytes], int]]:
    found: dict[str, Callable[[bytes], int]] = {"zlib -6 (baseline)": zlib_like(zlib, 6), "zlib -1": zlib_like(zlib, 1)}
    try:
        from zlib_ng import zlib_ng
        for level in (1, 3, 5, 6):
            found[f"zlib-ng -{level}"] = zlib_like(zlib_ng, level)
    except ImportError:
        print("(zlib-ng not installed: pip install zlib-ng)")
    try:
        from isal import isal_zlib
        for level in (1, 2, 3):
            found[f"isal -{level}"] = zlib_like(isal_zlib, level)
    except ImportError:
        print("(isal not installed: pip install isal)")
    for level in (1, 3, 4, 5, 6, 7):
        found[f"libdeflate -{level}"] = lambda data, level=level: len(deflate.gzip_compress(data, level))
    found["zstd -3 (zstd layers)"] = lambda data: len(zstandard.ZstdCompressor(level=3).compress(data))
    return found


def timed(fn: Callable[[], int], repeat: int) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = fn()
        best = min(best, time.perf_counter() - started)
    return best, size


def chunked_writer(data: bytes, threads: int) -> int:
    out = io.BytesIO()
    with ThreadPoolExecutor(threads) as pool:
        writer = GzipChunkWriter(out, pool)
        for i in range(0, len(data), 1 << 16):
            writer.write(data[i:i + (1 << 16)])
        writer.close()
    return len(out.getvalue())


def external(argv: list[str], data: bytes) -> int:
    return len(subprocess.run(argv, input=data, capture_output=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-mb", type=float, default=0, help="use the largest packages up to this many MB of tar (0: all)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-compressors-") as tmp:
        tars = package_tars(Path(tmp), int(args.max_mb * MB))
    data = b"".join(t for _, t in tars)
    cores = os.cpu_count() or 2
    print(f"{len(tars)} packages, {len(data) / MB:.1f} MB of layer tar "
          f"(largest: {', '.join(f'{n} {len(t) / MB:.1f} MB' for n, t in tars[:3])}); {cores} cores\n")

    # Per package, as layers are compressed: one stream per package, summed.
    def per_package(fn: Callable[[bytes], int]) -> Callable[[], int]:
        return lambda: sum(fn(t) for _, t in tars)

    results = {name: timed(per_package(fn), args.repeat) for name, fn in candidates().items()}
    base_s, base_size = results["zlib -6 (baseline)"]
    print("| one core, one stream per package | MB/s | size vs zlib -6 | speed vs zlib -6 |")
    print("|---|---|---|---|")
    for name, (seconds, size) in results.items():
        print(f"| {name} | {len(data) / MB / seconds:.1f} | {size / base_size:.4f}x | {base_s / seconds:.2f}x |")

    print(f"\n| libdeflate -{DEFLATE_LEVEL} in independent chunks (one gzip member each) | size vs zlib -6 |")
    print("|---|---|")
    for chunk in (256 << 10, 1 << 20, 4 << 20):
        size = sum(len(deflate.gzip_compress(t[i:i + chunk], DEFLATE_LEVEL))
                   for _, t in tars for i in range(0, len(t), chunk))
        print(f"| {chunk >> 10} KiB{' (condery)' if chunk == CHUNK_SIZE else ''} | {size / base_size:.4f}x |")

    print(f"\n| all cores, the largest package ({tars[0][0]}, {len(tars[0][1]) / MB:.1f} MB) | seconds | MB/s | vs gzip -6 |")
    print("|---|---|---|---|")
    largest = tars[0][1]
    rows: dict[str, tuple[float, int]] = {}
    if shutil.which("gzip"):
        rows["gzip -6 (CLI, one core)"] = timed(lambda: external(["gzip", "-6", "-n"], largest), args.repeat)
    if shutil.which("pigz"):
        rows[f"pigz -6 -p {cores}"] = timed(lambda: external(["pigz", "-6", "-n", "-p", str(cores)], largest), args.repeat)
    for threads in sorted({1, 2, cores}):
        rows[f"condery GzipChunkWriter, {threads} thread(s)"] = timed(lambda t=threads: chunked_writer(largest, t), args.repeat)
    reference = rows.get("gzip -6 (CLI, one core)", (0.0, 0))[0]
    for name, (seconds, size) in rows.items():
        ratio = f"{reference / seconds:.2f}x faster" if reference else "-"
        print(f"| {name} | {seconds:.3f} | {len(largest) / MB / seconds:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
