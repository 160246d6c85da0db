"""Benchmark: cold image build and warm manifest serving, each beside its baseline.

    python3 bench/bench_build.py [--image python/tqdm/xz] [--requests 3000] [--concurrency 16]

1. Cold build of the image (fresh store, fresh package cache) with condery's builder,
   beside what a hand-written conda Dockerfile does with the same records: install them
   into one directory with py-rattler, then `tar | gzip` the directory.
2. Warm manifest GETs against a running `condery serve`, beside CNCF Distribution
   (`docker-registry`) serving the very same manifest (pushed to it with skopeo):
   p50/p99 latency and requests per second from one load generator (aiohttp, in its
   own process, the same code for both servers).

Uses the test fixture channel and glibc base (tests/fixtures), so it runs offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import compressors, dockerfile_baseline  # noqa: E402
from condery.build import ImageService  # noqa: E402
from condery.config import load_config  # noqa: E402
from condery.registry.names import parse_name  # noqa: E402
from condery.registry.oci_layout import write_oci_layout  # noqa: E402
from condery.registry.tags import Latest  # noqa: E402
from condery.state import AppState  # noqa: E402
from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.channel import build_fixture_channel  # noqa: E402
from tests.fixtures.procs import free_port, running  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def cold_build(work: Path, channel: Path, base: Path, image: str) -> tuple[float, list, Path]:
    config = load_config(
        None,
        environ={},
        channels=[str(channel)],
        base_image=f"oci:{base}:bookworm",
        storage={"backend": "filesystem", "path": str(work / "store")},
        package_cache=str(work / "pkgs"),
    )
    state = await AppState.open(config)
    try:
        service = ImageService(state)
        request = parse_name(image, config.meta_packages)
        # The base image is imported once, like a Dockerfile's FROM that is already pulled.
        records = await service.solve(request, Latest(), "linux-64")
        started = time.perf_counter()
        ref, _ = await service.build(request, Latest())
        elapsed = time.perf_counter() - started
        layout = work / "layout"
        info = await state.store.blob_info(ref.oci_digest)
        await write_oci_layout(state.store, ref.oci_digest, ref.oci_media_type, info.size, "latest", layout)
        return elapsed, records, layout
    finally:
        await state.close()


async def baseline_build(work: Path, records: list) -> float:
    """What `RUN micromamba install ...` plus the engine's layer commit amount to."""
    result = await dockerfile_baseline(records, work, "gzip -6", compressors()["gzip -6"])
    return result.seconds


async def load(url: str, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(range(requests))

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.get(url, headers={"Accept": OCI_MANIFEST}) as answer:
                    await answer.read()
                    assert answer.status == 200, answer.status
                latencies.append(time.perf_counter() - started)

        for _ in range(50):  # warm up connections and caches
            async with session.get(url, headers={"Accept": OCI_MANIFEST}) as answer:
                await answer.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": requests / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def load_in_subprocess(url: str, requests: int, concurrency: int) -> dict:
    code = (
        "import asyncio, json, sys; sys.path.insert(0, %r); from bench.bench_build import load; "
        "print(json.dumps(asyncio.run(load(%r, %d, %d))))" % (str(ROOT), url, requests, concurrency)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="python/tqdm/xz")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="condery-bench-") as tmp:
        work = Path(tmp)
        channel = build_fixture_channel(work / "channel")
        base = glibc_base_layout()

        build_s, records, layout = asyncio.run(cold_build(work / "condery", channel, base, args.image))
        baseline_s = asyncio.run(baseline_build(work / "baseline", records))
        print(f"cold build of {args.image} ({len(records)} packages)")
        print(f"  condery (one layer per package):   {build_s:7.2f} s")
        print(f"  baseline (rattler install + tar|gzip): {baseline_s:7.2f} s")
        print(f"  ratio condery/baseline:             {build_s / baseline_s:7.2f}x")

        # Warm manifest GETs: condery (serving the store built above) vs docker-registry.
        port = free_port()
        config = work / "condery.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "channels": [str(channel)],
                    "base_image": f"oci:{base}:bookworm",
                    "storage": {"backend": "filesystem", "path": str(work / "condery" / "store")},
                    "package_cache": str(work / "condery" / "pkgs"),
                }
            )
        )
        reg_port = free_port()
        reg_config = work / "registry.yml"
        reg_config.write_text(
            yaml.safe_dump(
                {
                    "version": 0.1,
                    "log": {"level": "error", "accesslog": {"disabled": True}},
                    "storage": {"filesystem": {"rootdirectory": str(work / "reg")}},
                    "http": {"addr": f"127.0.0.1:{reg_port}"},
                }
            )
        )
        condery_argv = [sys.executable, "-m", "condery", "--config", str(config), "serve", "--port", str(port)]
        with running(condery_argv, url=f"http://127.0.0.1:{port}/v2/", log_path=work / "condery.log"), running(
            ["docker-registry", "serve", str(reg_config)],
            url=f"http://127.0.0.1:{reg_port}/v2/",
            log_path=work / "registry.log",
        ):
            subprocess.run(
                [
                    "skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{layout}:latest", f"docker://127.0.0.1:{reg_port}/bench/image:latest",
                ],
                check=True,
                capture_output=True,
            )
            name = "/".join(sorted(args.image.split("/")))
            ours = load_in_subprocess(
                f"http://127.0.0.1:{port}/v2/{name}/manifests/latest", args.requests, args.concurrency
            )
            theirs = load_in_subprocess(
                f"http://127.0.0.1:{reg_port}/v2/bench/image/manifests/latest", args.requests, args.concurrency
            )
        print(f"warm manifest GET ({args.requests} requests, {args.concurrency} connections)")
        for label, figures in (("condery", ours), ("docker-registry", theirs)):
            print(
                f"  {label:16s} {figures['rps']:8.0f} req/s  p50 {figures['p50_ms']:6.2f} ms"
                f"  p99 {figures['p99_ms']:6.2f} ms"
            )
        print(f"  throughput ratio condery/docker-registry: {ours['rps'] / theirs['rps']:.2f}x")


if __name__ == "__main__":
    main()
