"""Benchmark: cold image build and warm manifest serving, each beside its baseline.

    python3 bench/bench_build.py [--image python/tqdm/xz] [--seconds 5] [--concurrency 16] [--blob-concurrency 4]

1. Cold build of the image (fresh store, fresh package cache) with condery's builder,
   beside what a hand-written conda Dockerfile does with the same records: install them
   into one directory with py-rattler, then `tar | gzip` the directory.
2. Warm GETs from `wrk` (bench/wrk.py): manifest GETs against a running `condery serve`
   beside CNCF Distribution (`docker-registry` with its in-memory blob descriptor cache)
   serving the very same image (pushed to it with skopeo), and GETs of one ~7 MB layer
   against both and against nginx serving the blob file with sendfile. Requests per
   second, p50/p99 latency and MB/s, the ratios, and the targets (manifests >= 3x
   Distribution, blobs >= 0.9x nginx) with pass/fail.

Uses the test fixture channel and glibc base (tests/fixtures), so it runs offline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import compressors, dockerfile_baseline  # noqa: E402
from bench.wrk import Load, wrk_load  # noqa: E402
from condery.build.service import ImageService  # noqa: E402
from condery.build.state import AppState  # noqa: E402
from condery.config import load_config  # noqa: E402
from condery.image.names import parse_name  # noqa: E402
from condery.image.tags import Latest  # noqa: E402
from condery.oci.layout import write_oci_layout  # noqa: E402
from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.channel import build_fixture_channel  # noqa: E402
from tests.fixtures.nginx import static_nginx  # noqa: E402
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


def closest_layer(url: str, size: int) -> dict:
    """The layer of the manifest at `url` whose size is closest to `size` bytes."""
    request = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})
    with urllib.request.urlopen(request, timeout=60) as answer:
        layers = json.loads(answer.read())["layers"]
    return min(layers, key=lambda layer: abs(layer["size"] - size))


def print_loads(title: str, loads: dict[str, Load]) -> None:
    print(title)
    for label, load in loads.items():
        print(f"  {label:16s} {load.rps:8.0f} req/s  p50 {load.p50_ms:7.2f} ms  p99 {load.p99_ms:7.2f} ms"
              f"  {load.mb_per_s:8.1f} MB/s")


def target_line(label: str, ratio: float, target: float) -> str:
    return f"  {label}: {ratio:.2f}x (target >= {target}x: {'pass' if ratio >= target else 'FAIL'})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="python/tqdm/xz")
    parser.add_argument("--seconds", type=float, default=5.0, help="of load per server and kind")
    parser.add_argument("--concurrency", type=int, default=16, help="connections for manifest GETs")
    parser.add_argument("--blob-concurrency", type=int, default=4, help="connections for blob GETs")
    parser.add_argument("--blob-size", type=int, default=7 << 20, help="bytes; the layer closest to it is used")
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

        # Warm GETs: condery (serving the store built above), docker-registry, nginx.
        store = work / "condery" / "store"
        port = free_port()
        config = work / "condery.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "channels": [str(channel)],
                    "base_image": f"oci:{base}:bookworm",
                    "storage": {"backend": "filesystem", "path": str(store)},
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
                    # Distribution's own answer to repeated manifest and blob lookups.
                    "storage": {"filesystem": {"rootdirectory": str(work / "reg")},
                                "cache": {"blobdescriptor": "inmemory"}},
                    "http": {"addr": f"127.0.0.1:{reg_port}"},
                }
            )
        )
        condery_argv = [sys.executable, "-m", "condery", "--config", str(config), "serve", "--port", str(port)]
        with running(condery_argv, url=f"http://127.0.0.1:{port}/v2/", log_path=work / "condery.log"), running(
            ["docker-registry", "serve", str(reg_config)],
            url=f"http://127.0.0.1:{reg_port}/v2/",
            log_path=work / "registry.log",
        ), static_nginx(work / "nginx", store / "blobs") as blob_server:
            subprocess.run(
                [
                    "skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{layout}:latest", f"docker://127.0.0.1:{reg_port}/bench/image:latest",
                ],
                check=True,
                capture_output=True,
            )
            name = "/".join(sorted(args.image.split("/")))
            ours_url, theirs_url = f"http://127.0.0.1:{port}/v2/{name}", f"http://127.0.0.1:{reg_port}/v2/bench/image"

            def warm_load(url: str, connections: int, accept: str | None = None) -> Load:
                # A second of the same load first, discarded: every server measured warm
                # (condery's first GETs of a fresh process check the image's blobs and
                # hash each blob once; Distribution fills its in-memory descriptor cache).
                wrk_load(url, accept=accept, seconds=1, connections=connections)
                return wrk_load(url, accept=accept, seconds=args.seconds, connections=connections)

            manifests = {
                label: warm_load(f"{url}/manifests/latest", args.concurrency, OCI_MANIFEST)
                for label, url in (("condery", ours_url), ("docker-registry", theirs_url))
            }
            layer = closest_layer(f"{ours_url}/manifests/latest", args.blob_size)
            blob_path = layer["digest"].replace(":", "/")
            blobs = {
                label: warm_load(url, args.blob_concurrency)
                for label, url in (
                    ("condery", f"{ours_url}/blobs/{layer['digest']}"),
                    ("docker-registry", f"{theirs_url}/blobs/{layer['digest']}"),
                    ("nginx sendfile", f"{blob_server.url}/{blob_path}"),
                )
            }
        print_loads(f"warm manifest GET ({args.seconds:g} s each, {args.concurrency} connections, wrk)", manifests)
        print_loads(f"warm blob GET of a {layer['size'] / 1e6:.1f} MB layer ({args.seconds:g} s each, "
                    f"{args.blob_concurrency} connections, wrk)", blobs)
        print(target_line("manifest GETs condery/docker-registry",
                          manifests["condery"].rps / manifests["docker-registry"].rps, 3.0))
        print(target_line("blob GETs condery/nginx sendfile", blobs["condery"].rps / blobs["nginx sendfile"].rps, 0.9))
        print(f"  blob GETs condery/docker-registry: {blobs['condery'].rps / blobs['docker-registry'].rps:.2f}x")


if __name__ == "__main__":
    main()
