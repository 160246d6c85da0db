"""Benchmark: how the cost of an image grows with its size and its number of packages.

    python3 bench/bench_scale.py [--quick] [--sizes 10,100,1000] [--packages 5,50,300] [--conda-forge]

For every image size (MB unpacked) and package count, a channel of generated packages
(tests/fixtures/condapkg.py write_bulk_package: 2 MiB binary-like files, half
incompressible, a quarter of the bytes in 2 KiB text files, one placeholder each) and a
meta-package `scale-image` depending on all of them. Then, in the same run:

- cold: a fresh `condery serve` (base `scratch`, empty store and package cache), its layer
  worker processes up, answers the manifest GET of `scale-image`: solve, fetch, build,
  store every layer;
- warm: the same server answers a whole pull again (manifest and every blob, three at a
  time like docker's default), bodies read and dropped;
- baselines (bench/baselines.py): py-rattler install of the same records plus
  `tar | gzip -6`, and the same with pigz on every core: a hand-written conda
  Dockerfile, and the best one could do.

The table gives each time per MB and per package, so linear growth (or not) shows as a
flat column; a second table shows where the cold build's time went (the phases and steps
of the server's `build ended` log line; phases overlap, so they do not add up) and the
CPU seconds the server used meanwhile (from /proc: how close it came to both cores).
`--quick` runs the small sizes only (10 MB with 5 and 50 packages). The fixed cost per
package: `--sizes 3 --packages 300` (300 packages of about 10 KB). `--conda-forge` adds
a conda-forge-shaped image: 300 packages whose sizes are drawn (seeded) from the real
`python=3.9` closure of ../shared/fixtures/conda-forge-subset-2024 (each record's archive
size, used as the package's unpacked size), with the same content mix. `--sizes 0`
runs that cell alone. Each cell ends with pass or FAIL against issue 18's targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import rattler
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import Baseline, dockerfile_baselines  # noqa: E402
from condery.observability.build_report import PHASES, STEPS  # noqa: E402
from tests.fixtures.condapkg import index_channel, write_bulk_package, write_conda_package  # noqa: E402
from tests.fixtures.procs import process_tree, running  # noqa: E402
from tests.test_e2e import serve  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MB = 1 << 20
TEXT_SHARE = 0.25  # of a package's bytes in small text files
IMAGE = "scale-image"
WARM_CONCURRENCY = 3  # docker's default max-concurrent-downloads
WARM_ROUNDS = 3


CONDA_FORGE_SUBSET = ROOT.parent / "shared" / "fixtures" / "conda-forge-subset-2024"


@dataclass(frozen=True)
class Cell:
    size_mb: int
    packages: int
    cold_s: float
    warm_s: float
    layer_bytes: int
    layers: int
    cpu_s: tuple[float, float]  # the server's user and system CPU seconds during the cold build
    phases: dict[str, float]
    baselines: list[Baseline]


def conda_forge_sizes(packages: int = 300, seed: int = 0) -> list[int]:
    """`packages` sizes drawn from the python=3.9 closure of the conda-forge subset fixture
    (its records' archive sizes), the same on every run."""
    with tempfile.TemporaryDirectory(prefix="condery-bench-cf-") as tmp:
        for subdir in ("linux-64", "noarch"):
            (Path(tmp) / subdir).mkdir()
            with open(CONDA_FORGE_SUBSET / subdir / "repodata.json.zst", "rb") as raw:
                (Path(tmp) / subdir / "repodata.json").write_bytes(zstandard.ZstdDecompressor().stream_reader(raw).read())
        glibc = rattler.GenericVirtualPackage(rattler.PackageName("__glibc"), rattler.Version("2.17"),
                                              rattler.BuildString("0"))
        closure = asyncio.run(rattler.solve([tmp], ["python=3.9"], platforms=["linux-64", "noarch"],
                                            virtual_packages=[glibc]))
    sizes = sorted(r.size or 0 for r in closure)
    rng = random.Random(seed)
    return [rng.choice(sizes) for _ in range(packages)]


def write_channel(channel: Path, size_mb: int, packages: int, sizes: list[int] | None = None) -> None:
    names = []
    for i in range(packages):
        name = f"scale-{i:03d}"
        per_package = sizes[i] if sizes else size_mb * MB // packages
        write_bulk_package(channel, name, size=per_package, small_files=int(per_package * TEXT_SHARE) // 2048)
        names.append(name)
    write_conda_package(channel, IMAGE, "1.0", "0", depends=names)
    index_channel(channel)


def build_ended(log: Path) -> dict[str, float]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        try:
            fields = json.loads(line)
        except ValueError:
            continue
        if fields.get("msg") == "build ended":
            return {k[:-2]: float(v) for k, v in fields.items() if k.endswith("_s")}
    return {}


def wait_for_layer_workers(pid: int, timeout: float = 20.0) -> None:
    """Until the server's layer worker processes (condery/layers/workers.py, one per core)
    are up and have imported what they run (their CPU time stands still), as on any
    server that has run for a few seconds: the cold build measured is the image's, not
    the server's start."""
    deadline = time.monotonic() + timeout
    last: tuple[float, ...] = ()
    while time.monotonic() < deadline:
        workers = [p for p in process_tree(pid)[1:]
                   if b"multiprocessing.spawn" in Path(f"/proc/{p}/cmdline").read_bytes()]
        used = tuple(sum(cpu_seconds(p)) for p in workers)
        if len(workers) >= (os.cpu_count() or 2) and used == last:
            return
        last = used
        time.sleep(0.3)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds process `pid` has used, its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def get_manifest(url: str) -> dict:
    request = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=3600) as answer:
        return json.loads(answer.read())


async def warm_pull(base: str, digests: list[str]) -> float:
    """Seconds for the manifest GET and every blob GET, WARM_CONCURRENCY at a time."""
    slots = asyncio.Semaphore(WARM_CONCURRENCY)
    async with aiohttp.ClientSession() as session:

        async def fetch(url: str, headers: dict[str, str] | None = None) -> None:
            async with slots, session.get(url, headers=headers) as answer:
                assert answer.status == 200, (url, answer.status)
                async for _ in answer.content.iter_chunked(1 << 20):
                    pass

        started = time.perf_counter()
        await fetch(f"{base}/v2/{IMAGE}/manifests/latest", {"Accept": OCI_MANIFEST})
        await asyncio.gather(*(fetch(f"{base}/v2/{IMAGE}/blobs/{d}") for d in digests))
        return time.perf_counter() - started


def measure(work: Path, size_mb: int, packages: int, sizes: list[int] | None = None) -> Cell:
    channel = work / "channel"
    write_channel(channel, size_mb, packages, sizes)
    # Every contender starts with nothing left to write back: without this, the flush
    # of the channel just written (up to 1 GB) lands in condery's cold run alone.
    os.sync()
    records = asyncio.run(rattler.solve([str(channel)], [IMAGE], platforms=["linux-64"]))
    (work / "condery").mkdir()
    argv, _, port = serve(work / "condery", [str(channel)], "scratch", log_format="json", build_timeout=3600)
    base = f"http://127.0.0.1:{port}"
    log = work / "condery" / "condery.log"
    with running(argv, url=base + "/v2/", log_path=log, timeout=60) as server:
        wait_for_layer_workers(server.pid)
        cpu_before = cpu_seconds(server.pid)
        started = time.perf_counter()
        manifest = get_manifest(f"{base}/v2/{IMAGE}/manifests/latest")
        cold = time.perf_counter() - started
        cpu_after = cpu_seconds(server.pid)
        digests = [layer["digest"] for layer in manifest["layers"]]
        warm = min(asyncio.run(warm_pull(base, digests)) for _ in range(WARM_ROUNDS))
    layer_bytes = sum(layer["size"] for layer in manifest["layers"])
    phases = build_ended(log)
    shutil.rmtree(work / "condery", ignore_errors=True)  # its disk back before the baselines run
    os.sync()
    baselines = asyncio.run(dockerfile_baselines(records, work / "baselines"))
    cpu = (cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1])
    return Cell(size_mb, packages, cold, warm, layer_bytes, len(digests), cpu, phases, baselines)


def print_tables(cells: list[Cell]) -> None:
    labels = [b.label for b in cells[0].baselines]
    print("cold and warm pulls of generated images (ms per MB unpacked | ms per package)")
    head = f"  {'size':>7} {'pkgs':>4} {'layers':>6} | {'condery cold':>24} | {'warm pull':>22}"
    for label in labels:
        head += f" | {label:>20}"
    head += f" | {'bytes/gzip -6':>13}"
    print(head)
    for c in cells:
        row = (f"  {c.size_mb:>4} MB {c.packages:>4} {c.layers:>6} | {c.cold_s:7.2f} s "
               f"{1000 * c.cold_s / c.size_mb:6.1f} {1000 * c.cold_s / c.packages:7.1f} | "
               f"{c.warm_s:6.2f} s {1000 * c.warm_s / c.size_mb:5.2f} {1000 * c.warm_s / c.packages:6.2f}")
        for b in c.baselines:
            row += f" | {b.seconds:7.2f} s {c.cold_s / b.seconds:5.2f}x cdry"
        gzip6 = c.baselines[0]
        row += f" | {c.layer_bytes / gzip6.layer_bytes:12.3f}x"
        print(row)
    print("  (baseline columns: the Dockerfile's time, then condery's cold time as a multiple of it;"
          " targets <= 0.5x gzip -6, <= 1.0x pigz, bytes <= 1.03x)")
    print()
    print("targets (issue 18): cold <= 0.5x gzip -6 and <= 1.0x pigz, bytes <= 1.03x; 10 KB packages:"
          " < 5 ms a package")
    for c in cells:
        gzip6, best = c.baselines[0], c.baselines[-1]
        checks = [("cold/gzip -6", c.cold_s / gzip6.seconds, 0.5), ("cold/pigz", c.cold_s / best.seconds, 1.0),
                  ("bytes", c.layer_bytes / gzip6.layer_bytes, 1.03)]
        if c.size_mb * 1024 / c.packages <= 16:  # packages of about 10 KB: the fixed cost per package
            checks.append(("ms/package", 1000 * c.cold_s / c.packages, 5.0))
        print(f"  {c.size_mb:>4} MB {c.packages:>4}: " + ", ".join(
            f"{name} {value:.2f} {'pass' if value <= limit else 'FAIL'}" for name, value, limit in checks))
    print()
    print("where a cold build's time goes (seconds of wall time in which the phase or step ran)")
    names = [*PHASES, *STEPS]
    print(f"  {'size':>7} {'pkgs':>4} | " + " ".join(f"{n:>9}" for n in names)
          + f" | {'cpu user':>8} {'sys':>5} | {'gzip -6 install':>15} {'pack':>6}")
    for c in cells:
        gzip6 = c.baselines[0]
        print(f"  {c.size_mb:>4} MB {c.packages:>4} | " + " ".join(f"{c.phases.get(n, 0.0):9.2f}" for n in names)
              + f" | {c.cpu_s[0]:8.2f} {c.cpu_s[1]:5.2f} | {gzip6.install_seconds:15.2f} {gzip6.pack_seconds:6.2f}")
    print("  (cpu: the server's CPU seconds during the cold build, all its threads; 2 cores give 2 a second)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="10 MB images of 5 and 50 packages only")
    parser.add_argument("--sizes", default="10,100,1000", help="image sizes in MB, comma separated")
    parser.add_argument("--packages", default="5,50,300", help="packages per image, comma separated")
    parser.add_argument("--conda-forge", action="store_true",
                        help="add the conda-forge-shaped image (300 packages sized as the python=3.9 closure)")
    args = parser.parse_args()
    sizes = [10] if args.quick else [int(s) for s in args.sizes.split(",") if int(s)]
    counts = [5, 50] if args.quick else [int(n) for n in args.packages.split(",")]

    cells = []
    if args.conda_forge:
        shaped = conda_forge_sizes()
        size_mb = max(1, round(sum(shaped) / MB))
        with tempfile.TemporaryDirectory(prefix="condery-bench-scale-") as tmp:
            cell = measure(Path(tmp), size_mb, len(shaped), shaped)
        cells.append(cell)
        print(f"  measured the conda-forge-shaped image ({size_mb} MB x {len(shaped)} packages):"
              f" cold {cell.cold_s:.2f} s", flush=True)
    for size_mb in sizes:
        for packages in counts:
            with tempfile.TemporaryDirectory(prefix="condery-bench-scale-") as tmp:
                cell = measure(Path(tmp), size_mb, packages)
            cells.append(cell)
            print(f"  measured {size_mb} MB x {packages} packages: cold {cell.cold_s:.2f} s", flush=True)
    print()
    print_tables(cells)


if __name__ == "__main__":
    main()
