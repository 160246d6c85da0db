"""Benchmark: peak memory of `condery serve` while it builds one big package's layer.

    python3 bench/bench_memory.py [--sizes 100,300,1000] [--small-files 20000]

For each size (MB) a generated package (tests/fixtures/condapkg.py write_bulk_package:
2 MiB binary-like files, half incompressible, plus `--small-files` 2 KiB text files and
one placeholder) is pulled from a fresh `condery serve` (base `scratch`, filesystem
store). The server's peak RSS (VmHWM) is reset once the server is up and read after the
pull, so the figure is what the build added to an idle server; the idle RSS is printed
beside it. Both figures add up the server's process tree (tests/fixtures/procs.py
peak_rss): its layer worker processes write the layers (condery/layers/workers.py). Target: under 300 MB for a 1 GB package, and flat across sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.condapkg import index_channel, write_bulk_package  # noqa: E402
from tests.fixtures.procs import peak_rss, reset_peak_rss, running  # noqa: E402
from tests.test_e2e import serve  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TARGET_PEAK = 300 << 20
MB = 1 << 20


def pull_manifest(url: str, timeout: float = 1800) -> None:
    request = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        answer.read()


def measure(work: Path, size_mb: int, small_files: int) -> tuple[int, int, float]:
    """(idle RSS, peak RSS during the build, build seconds) for one package of `size_mb`."""
    channel = work / "channel"
    name = f"bulk-{size_mb}mb"
    write_bulk_package(channel, name, size=size_mb * MB, small_files=small_files)
    index_channel(channel)
    argv, _, port = serve(work, [str(channel)], "scratch", build_timeout=3600)
    url = f"http://127.0.0.1:{port}"
    with running(argv, url=url + "/v2/", log_path=work / "condery.log",
                 timeout=60) as proc:
        reset_peak_rss(proc.pid)
        idle = peak_rss(proc.pid)
        started = time.perf_counter()
        pull_manifest(f"{url}/v2/{name}/manifests/latest")
        elapsed = time.perf_counter() - started
        return idle, peak_rss(proc.pid), elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,300,1000", help="package sizes in MB, comma separated")
    parser.add_argument("--small-files", type=int, default=20000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print(f"peak RSS of condery serve building one package ({args.small_files} small files each)")
    print(f"  {'package':>9}  {'idle RSS':>9}  {'peak RSS':>9}  {'build':>8}")
    peaks = []
    for size_mb in sizes:
        with tempfile.TemporaryDirectory(prefix="condery-bench-mem-") as tmp:
            idle, peak, elapsed = measure(Path(tmp), size_mb, args.small_files)
        peaks.append(peak)
        print(f"  {size_mb:>6} MB  {idle / MB:>6.0f} MB  {peak / MB:>6.0f} MB  {elapsed:>6.1f} s")
    largest = peaks[-1]
    verdict = "pass" if largest < TARGET_PEAK else "FAIL"
    print(f"  peak at {sizes[-1]} MB: {largest / MB:.0f} MB, target < {TARGET_PEAK // MB} MB: {verdict}")
    if len(peaks) > 1:
        print(f"  growth {sizes[0]} MB -> {sizes[-1]} MB: {(peaks[-1] - peaks[0]) / MB:+.0f} MB "
              f"({peaks[-1] / peaks[0]:.2f}x)")


if __name__ == "__main__":
    main()
