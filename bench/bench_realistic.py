"""Benchmark: a cold pull of real scientific software, beside a hand-written Dockerfile.

    python3 bench/bench_realistic.py [--image python/numpy/scipy/pandas/matplotlib]

The image holds numpy, scipy, pandas, matplotlib and their dependencies: their PyPI
wheels repackaged as conda packages (tests/fixtures/wheel_packages.py; hundreds of MB,
thousands of files), on the fixture python and glibc base, so it runs offline.

1. condery: `skopeo copy` of the image from a `condery serve` with an empty store and
   package cache (the base image already imported, as a Dockerfile's FROM is already
   pulled): solve, fetch, one layer per package, transfer.
2. The baselines (bench/baselines.py), with the very records condery solved: py-rattler
   install + `tar | gzip -6`, and the same with pigz on all cores.

Printed: seconds and ratios (targets: condery <= 0.5x the gzip baseline and <= 1.0x
pigz), and the image's conda layer bytes beside the gzip -6 layer (target <= 1.03x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import rattler
from rattler import BuildString, Channel, GenericVirtualPackage, PackageName, Version

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import dockerfile_baselines, ratio_line  # noqa: E402
from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.clients import skopeo_copy  # noqa: E402
from tests.fixtures.wheel_packages import build_realistic_channel  # noqa: E402
from tests.test_e2e import condery  # noqa: E402

# What the glibc test base offers the solve (bookworm's glibc), as condery derives it.
VIRTUAL_PACKAGES = [
    GenericVirtualPackage(PackageName("__glibc"), Version("2.36"), BuildString("0")),
    GenericVirtualPackage(PackageName("__unix"), Version("0"), BuildString("0")),
    GenericVirtualPackage(PackageName("__linux"), Version("6.1"), BuildString("0")),
]


def layer_digests(layout: Path, tag: str) -> list[tuple[str, int]]:
    """(digest, size) of every layer of `tag`'s manifest in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    manifest = json.loads((layout / "blobs" / "sha256" / entry["digest"].split(":", 1)[1]).read_bytes())
    return [(layer["digest"], layer["size"]) for layer in manifest["layers"]]


def solved_records(channel: Path, image: str, api_json: dict) -> list[rattler.RepoDataRecord]:
    """The records condery built, as rattler records (checked against condery's own list)."""
    specs = image.split("/")
    records = asyncio.run(
        rattler.solve([Channel(channel.as_uri())], specs, platforms=["linux-64", "noarch"],
                      virtual_packages=VIRTUAL_PACKAGES)
    )
    ours = {r.sha256.hex() for r in records if r.sha256 is not None}
    theirs = {p["sha256"] for p in api_json["platforms"]["linux-64"]["packages"]}
    if ours != theirs:
        raise RuntimeError(f"the baseline's solve differs from condery's: {sorted(ours ^ theirs)}")
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="python/numpy/scipy/pandas/matplotlib")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="condery-bench-") as tmp:
        work = Path(tmp)
        channel = build_realistic_channel(work / "channel")
        base = glibc_base_layout()
        base_layers = {digest for digest, _ in layer_digests(base, "bookworm")}
        for package in channel.rglob("*.conda"):
            package.read_bytes()  # the same warm page cache for condery and the baselines

        (work / "condery").mkdir()
        with condery(work / "condery", [str(channel)], f"oci:{base}:bookworm",
                     env={"PYTHONPATH": str(ROOT)}) as registry:
            # Import the base with an image that shares no package with the measured one.
            skopeo_copy(f"{registry.host}/condery-empty:latest", work / "warmup", "latest")
            started = time.perf_counter()
            skopeo_copy(f"{registry.host}/{args.image}:latest", work / "pulled", "latest")
            pull_s = time.perf_counter() - started
            with urllib.request.urlopen(f"{registry.url}/api/v1/images/{args.image}/latest", timeout=600) as answer:
                api_json = json.loads(answer.read())
        layers = [(d, size) for d, size in layer_digests(work / "pulled", "latest") if d not in base_layers]
        condery_bytes = sum(size for _, size in layers)

        records = solved_records(channel, args.image, api_json)
        gzip_b, pigz_b = asyncio.run(dockerfile_baselines(records, work / "baselines"))

    mb = 1e6
    print(f"cold pull of {args.image}: {len(records)} packages, {gzip_b.tar_bytes / mb:.0f} MB unpacked")
    print(ratio_line("condery (skopeo copy, empty store)", pull_s, gzip_b.seconds, target="<= 0.50x gzip"))
    print(ratio_line(f"baseline: rattler install + tar | {gzip_b.label}", gzip_b.seconds, gzip_b.seconds))
    print(ratio_line(f"baseline: rattler install + tar | {pigz_b.label}", pigz_b.seconds, gzip_b.seconds))
    print(f"    (install {gzip_b.install_seconds:.2f} s + pack {gzip_b.pack_seconds:.2f} s;"
          f" pigz: install {pigz_b.install_seconds:.2f} s + pack {pigz_b.pack_seconds:.2f} s)")
    print(f"  condery / pigz baseline: {pull_s / pigz_b.seconds:.2f}x  (target <= 1.00x)")
    print("layer bytes (the conda layers; the base layer is the same for both)")
    print(ratio_line(f"condery, {len(layers)} layers", condery_bytes / mb, gzip_b.layer_bytes / mb, "MB",
                     target="<= 1.03x"))
    print(ratio_line(f"baseline {gzip_b.label}, 1 layer", gzip_b.layer_bytes / mb, gzip_b.layer_bytes / mb, "MB"))
    print(ratio_line(f"baseline {pigz_b.label}, 1 layer", pigz_b.layer_bytes / mb, gzip_b.layer_bytes / mb, "MB"))


if __name__ == "__main__":
    main()
