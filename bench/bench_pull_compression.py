"""Benchmark: what a client feels for the gzip and the zstd image of the same name.

    python3 bench/bench_pull_compression.py [--image python/tqdm/xz] [--repeat 3]

Two `condery serve` processes on the fixture channel and glibc base, one with the
default `layer_compression: gzip`, one with `zstd`, each warmed by one pull (builds are
not timed here: bench_build.py does that). Then, for each, best of --repeat:
- `skopeo copy` to an OCI layout (download and digest checks);
- unpack of that layout's layers in order with GNU tar (`tar -xzf` / `tar --zstd -xf`);
- `umoci unpack` (gzip only: Debian's umoci 0.4.7 refuses the zstd media type);
- `podman pull` into empty vfs storage (pull, decompress, unpack: what `docker pull` does);
and the bytes the client downloads (the image's layers of condery's own, and in all).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.channel import build_fixture_channel  # noqa: E402
from tests.fixtures.clients import Podman  # noqa: E402
from tests.fixtures.procs import free_port, running  # noqa: E402

MB = 1e6


def best_of(repeat: int, setup: Callable[[], None], action: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        setup()
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def run(argv: list[str], **kwargs) -> None:
    subprocess.run(argv, check=True, capture_output=True, **kwargs)


def layout_layers(layout: Path) -> list[dict]:
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_text())
    return list(manifest["layers"])


def tar_unpack(layout: Path, target: Path) -> None:
    target.mkdir()
    for layer in layout_layers(layout):
        flag = "--zstd" if layer["mediaType"].endswith("+zstd") else "--gzip"
        run(["tar", flag, "-xf", str(layout / "blobs/sha256" / layer["digest"].removeprefix("sha256:")),
             "-C", str(target)])


def measure(work: Path, host: str, image: str, repeat: int) -> dict[str, float]:
    layout, rootfs, bundle = work / "oci", work / "rootfs", work / "bundle"

    def clear(*paths: Path) -> Callable[[], None]:
        return lambda: [shutil.rmtree(p, ignore_errors=True) for p in paths]  # type: ignore[func-returns-value]

    ref = f"{host}/{image}:latest"
    figures = {"skopeo copy": best_of(repeat, clear(layout), lambda: run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:latest"]))}
    layers = layout_layers(layout)
    figures["tar unpack"] = best_of(repeat, clear(rootfs), lambda: tar_unpack(layout, rootfs))
    if all(layer["mediaType"].endswith("gzip") for layer in layers):
        figures["umoci unpack"] = best_of(repeat, clear(bundle), lambda: run(
            ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)]))
    podman_root = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    podman = Podman(podman_root, insecure_registries=[host])
    try:
        def fresh() -> None:
            podman.podman("rmi", "--all", "--force", check=False)
        figures["podman pull"] = best_of(repeat, fresh, lambda: podman.pull(ref))
    finally:
        podman.cleanup()
    figures["MB downloaded"] = sum(layer["size"] for layer in layers) / MB
    figures["MB of condery's layers"] = sum(
        layer["size"] for layer in layers if "org.condery.packages" in layer.get("annotations", {})) / MB
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="python/tqdm/xz")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="condery-bench-pull-") as tmp:
        work = Path(tmp)
        channel = build_fixture_channel(work / "channel")
        base = glibc_base_layout()
        for compression in ("gzip", "zstd"):
            port = free_port()
            config = work / f"{compression}.yaml"
            config.write_text(yaml.safe_dump({
                "channels": [str(channel)],
                "base_image": f"oci:{base}:bookworm",
                "storage": {"backend": "filesystem", "path": str(work / compression / "store")},
                "package_cache": str(work / compression / "pkgs"),
                "layer_compression": compression,
            }))
            argv = [sys.executable, "-m", "condery", "serve", "--config", str(config), "--port", str(port)]
            url = f"http://127.0.0.1:{port}"
            with running(argv, url=url + "/v2/", log_path=work / f"{compression}.log"):
                warm = work / compression / "warm"
                run(["skopeo", "copy", "--src-tls-verify=false", f"docker://127.0.0.1:{port}/{args.image}:latest",
                     f"oci:{warm}:latest"], timeout=1800)
                results[compression] = measure(work / compression, f"127.0.0.1:{port}", args.image, args.repeat)

    gz, zs = results["gzip"], results["zstd"]
    print(f"client side of {args.image}, warm registry, best of {args.repeat}")
    print("| step | gzip | zstd | zstd/gzip |")
    print("|---|---|---|---|")
    for step in [*gz, *(s for s in zs if s not in gz)]:
        a, b = gz.get(step), zs.get(step)
        unit = "" if step.startswith("MB") else " s"
        cell = lambda v: f"{v:.2f}{unit}" if v is not None else "n/a"  # noqa: E731
        ratio = f"{b / a:.2f}x" if a and b else "-"
        print(f"| {step} | {cell(a)} | {cell(b)} | {ratio} |")


if __name__ == "__main__":
    main()
