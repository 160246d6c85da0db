"""Benchmark: what compiling python bytecode into layers adds to a cold build.

    python3 bench/bench_bytecode.py [--image python/tqdm/xz] [--rounds 3]

Builds every package layer of the image from a warm archive cache into fresh work
directories, once with the image's bytecode plan (condery/layers/bytecode.py) and once
without (the baseline: layers as before bytecode), alternating, and prints the median
total time of each, the ratio, and the layer bytes. Offline: the test fixture channel.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import rattler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from condery.layers.bytecode import BytecodePlan, HostInterpreters, bytecode_for, plan_bytecode  # noqa: E402
from condery.layers.package_layer import build_package_layer, python_site_packages  # noqa: E402
from tests.fixtures.channel import build_fixture_channel  # noqa: E402


async def build_all(records: list[rattler.RepoDataRecord], python: rattler.RepoDataRecord,
                    plan: BytecodePlan | None, compiled_names: set[str], work: Path,
                    pkgs: Path) -> tuple[float, float, int]:
    """Total seconds, seconds of the layers of `compiled_names`, bytes."""
    total = compiled = 0.0
    size = 0
    for record in records:  # one at a time: the figure is CPU time, not parallelism
        started = time.perf_counter()
        blob = await build_package_layer(record, python_record=python, prefix="/opt/conda", platform="linux-64",
                                         work_dir=work, package_cache_dir=pkgs, bytecode=bytecode_for(record, plan))
        elapsed = time.perf_counter() - started
        total += elapsed
        compiled += elapsed if record.name.normalized in compiled_names else 0.0
        size += blob.size
        blob.path.unlink()
    return total, compiled, size


async def main(image: str, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="condery-bench-pyc-") as tmp:
        work = Path(tmp)
        channel = build_fixture_channel(work / "channel")
        records = await rattler.solve([rattler.Channel(channel.as_uri())], image.split("/"),
                                      platforms=["linux-64", "noarch"])
        python = next(r for r in records if r.name.normalized == "python")
        plan = await plan_bytecode(python, python_site_packages(python), HostInterpreters())
        if not isinstance(plan, BytecodePlan):
            sys.exit(f"no bytecode here: {plan}")
        compiled = {r.name.normalized for r in records if bytecode_for(r, plan)}
        # Downloads and the page cache, outside the figures.
        await build_all(records, python, None, compiled, work / "warm", work / "pkgs")
        times: dict[str, list[float]] = {"with": [], "without": []}
        own: dict[str, list[float]] = {"with": [], "without": []}
        sizes: dict[str, int] = {}
        for i in range(rounds):
            for label, p in (("without", None), ("with", plan)):
                elapsed, mine, sizes[label] = await build_all(records, python, p, compiled,
                                                              work / f"{label}-{i}", work / "pkgs")
                times[label].append(elapsed)
                own[label].append(mine)
        with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
        own_with, own_without = statistics.median(own["with"]), statistics.median(own["without"])
        print(f"layers of {image} ({len(records)} packages; compiled: {', '.join(sorted(compiled)) or 'none'}), "
              f"median of {rounds}")
        print(f"  with bytecode ({plan.tag}):        {with_s:7.2f} s  {sizes['with'] / 1e6:7.2f} MB")
        print(f"  baseline, without bytecode:      {without_s:7.2f} s  {sizes['without'] / 1e6:7.2f} MB")
        print(f"  ratio with/without:              {with_s / without_s:7.2f}x  (+{with_s - without_s:.2f} s)")
        print(f"  the compiled packages' layers alone: {own_with:.2f} s with, {own_without:.2f} s without "
              f"({own_with / own_without:.2f}x, +{own_with - own_without:.2f} s)")
        print(f"  every round (s): with {', '.join(f'{t:.2f}' for t in times['with'])}; "
              f"without {', '.join(f'{t:.2f}' for t in times['without'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="python/tqdm/xz")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.image, args.rounds))
