"""Benchmark: two replicas on one bucket, and nginx in front of them.

    python3 bench/bench_replicas.py [--image python/tqdm/xz] [--seconds 5] [--concurrency 16]

The deploy/compose.yaml topology without a container engine: SeaweedFS (S3), Redis
(`coordination`), two `condery serve` replicas with their own empty package caches, and
nginx running deploy/nginx.conf (tests/fixtures/nginx.py maps its hostnames and paths).

1. The cold build of the image at replica 1 (manifest GET on empty caches and an empty
   bucket), beside the first GET of the same name at replica 2: its time, and the layer
   bytes replica 2 built (`condery_layer_bytes_total`) and the bytes added to the
   bucket's blobs meanwhile (goal: zero for both).
2. Warm manifest GETs through nginx over both replicas, beside replica 1 directly, with
   `wrk` (bench/wrk.py, the warm benchmarks' one load generator). nginx's per-client rate
   limits are left out here: the load comes from one address and would measure 429s.

Uses the test fixture channel and glibc base (tests/fixtures), so it runs offline.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.wrk import wrk_load  # noqa: E402
from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.channel import build_fixture_channel  # noqa: E402
from tests.fixtures.nginx import nginx  # noqa: E402
from tests.fixtures.procs import running  # noqa: E402
from tests.fixtures.redis_server import redis_server  # noqa: E402
from tests.fixtures.seaweed import SeaweedS3, seaweed_s3  # noqa: E402
from tests.test_e2e import serve  # noqa: E402

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def timed_get(url: str) -> float:
    request = urllib.request.Request(url, headers={"Accept": OCI_MANIFEST})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as answer:
        answer.read()
        assert answer.status == 200, answer.status
    return time.perf_counter() - started


def metric(url: str, line_start: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as answer:
        lines = answer.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(line_start))


def blob_bytes(seaweed: SeaweedS3, bucket: str) -> int:
    pages = seaweed.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="blobs/")
    return sum(item["Size"] for page in pages for item in page.get("Contents", []))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="python/tqdm/xz")
    parser.add_argument("--seconds", type=float, default=5.0, help="of load per target")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    name = "/".join(sorted(args.image.split("/")))

    with tempfile.TemporaryDirectory(prefix="condery-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        channel = build_fixture_channel(work / "channel")
        base = glibc_base_layout()
        seaweed = stack.enter_context(seaweed_s3(work / "seaweed"))
        redis = stack.enter_context(redis_server(work / "redis"))
        bucket = seaweed.create_bucket()
        storage = {"backend": "s3", "bucket": bucket, "endpoint_url": seaweed.endpoint_url, "region": "us-east-1"}
        urls = []
        for replica in ("r1", "r2"):
            (work / replica).mkdir()
            # As deploy/compose.yaml: every connection comes from nginx's one address.
            argv, _, port = serve(work / replica, [str(channel)], f"oci:{base}:bookworm", storage=storage,
                                  coordination={"backend": "redis", "url": redis.url},
                                  max_connections=1000, max_connections_per_client=1000)
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(running(argv, url=url + "/v2/", env=seaweed.env, log_path=work / replica / "log",
                                        timeout=60))
            urls.append(url)
        proxy = stack.enter_context(nginx(work / "nginx", [u.removeprefix("http://") for u in urls],
                                          rate_limits=False))

        path = f"/v2/{name}/manifests/latest"
        cold_s = timed_get(urls[0] + path)
        built_1 = metric(urls[0], "condery_layer_bytes_total")
        blobs_1 = blob_bytes(seaweed, bucket)
        second_s = timed_get(urls[1] + path)
        built_2 = metric(urls[1], "condery_layer_bytes_total")
        added_2 = blob_bytes(seaweed, bucket) - blobs_1
        builds_2 = metric(urls[1], "condery_builds_total")
        print(f"{args.image} on two replicas, one SeaweedFS bucket")
        print(f"  replica 1, cold build (empty caches):   {cold_s:7.2f} s, {built_1 / 1e6:6.2f} MB of layers built")
        print(f"  replica 2, first GET of the same name:  {second_s * 1000:7.1f} ms, {built_2:.0f} layer bytes built,"
              f" {added_2} bytes added to the bucket, {builds_2:.0f} builds")

        through = wrk_load(proxy.url + path, accept=OCI_MANIFEST, seconds=args.seconds, connections=args.concurrency)
        direct = wrk_load(urls[0] + path, accept=OCI_MANIFEST, seconds=args.seconds, connections=args.concurrency)
        print(f"warm manifest GET ({args.seconds:g} s each, {args.concurrency} connections, wrk)")
        for label, figures in (("nginx, 2 replicas", through), ("replica 1 direct", direct)):
            print(f"  {label:18s} {figures.rps:8.0f} req/s  p50 {figures.p50_ms:6.2f} ms"
                  f"  p99 {figures.p99_ms:6.2f} ms")
        print(f"  throughput ratio nginx+2/direct: {through.rps / direct.rps:.2f}x")


if __name__ == "__main__":
    main()
