"""Benchmark: pull-to-run, as a user feels it: `podman pull` of the realistic image, then
its first `python -c "import numpy"`, beside the same environment as one big layer (what
a Dockerfile's `RUN conda install` gives).

    python3 bench/bench_pull_to_run.py [--image python/numpy/scipy/pandas/matplotlib] [--repeat 2]

The image is bench_realistic.py's (numpy, scipy, pandas, matplotlib and their closure,
PyPI wheels repackaged as conda packages, on the fixture python and the glibc test base).
podman uses the overlay storage driver, as engines do (the tests use vfs, which copies
the whole tree once per layer and would measure itself). Each pull starts from empty
podman storage; the base image is in the registry already, not on the client.

Contenders, each timed as pull, first run, and their sum:
1. condery, cold registry: an empty store; the pull waits for the build.
2. condery, warm registry: the image built; every layer served from the store.
3. condery's image served by docker-registry (CNCF Distribution): the same layers from
   another server (a registry's own speed apart from the layer count).
4. condery with `layer_budget: 12`: fewer, grouped layers.
5. condery with `layer_compression: zstd`.
6. Baseline: one layer of the whole environment (py-rattler install + `tar | gzip -6`,
   the config of condery's image) pushed to docker-registry; cold, it also pays that
   build and the push.

Ratios are against the baseline's warm pull-to-run (6, without its build and push).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import install_records, pack_layer  # noqa: E402
from bench.bench_realistic import layer_digests, solved_records  # noqa: E402
from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.clients import Podman, skopeo_copy  # noqa: E402
from tests.fixtures.upstream import _start_registry  # noqa: E402
from tests.fixtures.wheel_packages import build_realistic_channel  # noqa: E402
from tests.test_e2e import condery  # noqa: E402


def first_run(image: str) -> list[str]:
    """`python -c "import numpy, scipy, ..."`: every package the name asks for but python."""
    modules = [c for c in image.split("/") if c != "python"]
    return ["python", "-c", f"import {', '.join(modules)}; print('imported', {len(modules)})"]


MB = 1e6


def pull_and_run(work: Path, ref: str, argv: list[str]) -> tuple[float, float]:
    """(pull seconds, first run seconds) with a podman whose storage starts empty."""
    podman = Podman(work / "podman", driver="overlay")
    try:
        started = time.perf_counter()
        podman.pull(ref, timeout=1800)
        pulled = time.perf_counter()
        result = podman.run(ref, argv, timeout=600)
        ran = time.perf_counter()
        if result.returncode != 0:
            raise RuntimeError(f"{ref}: the first run failed: {result.stderr[-2000:]}")
        return pulled - started, ran - pulled
    finally:
        podman.cleanup()


def best(work: Path, ref: str, argv: list[str], repeat: int) -> tuple[float, float]:
    runs = [pull_and_run(work, ref, argv) for _ in range(repeat)]
    return min(runs, key=sum)


def one_layer_image(pulled: Path, base: Path, layer: Path, out: Path) -> None:
    """An OCI layout: the base's layers, then `layer`, with the config of condery's image
    (`pulled`) but for its layers: what a Dockerfile FROM the base with one RUN gives."""
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    def manifest_of(layout: Path) -> dict[str, Any]:
        entry = json.loads((layout / "index.json").read_text())["manifests"][0]
        return json.loads((layout / "blobs/sha256" / entry["digest"].split(":", 1)[1]).read_bytes())

    base_manifest = manifest_of(base)
    base_config = json.loads((base / "blobs/sha256" / base_manifest["config"]["digest"].split(":", 1)[1]).read_bytes())
    for descriptor in base_manifest["layers"]:
        shutil.copyfile(base / "blobs/sha256" / descriptor["digest"].split(":", 1)[1],
                        blobs / descriptor["digest"].split(":", 1)[1])
    diff = hashlib.sha256()
    with gzip.open(layer, "rb") as stream:
        while chunk := stream.read(1 << 20):
            diff.update(chunk)
    layer_digest = hashlib.sha256(layer.read_bytes()).hexdigest()
    shutil.copyfile(layer, blobs / layer_digest)
    ours = manifest_of(pulled)
    config = json.loads((pulled / "blobs/sha256" / ours["config"]["digest"].split(":", 1)[1]).read_bytes())
    config["rootfs"]["diff_ids"] = [*base_config["rootfs"]["diff_ids"], f"sha256:{diff.hexdigest()}"]
    config["history"] = [*base_config.get("history", []), {"created_by": "RUN conda install (one layer)"}]
    config_digest, config_size = put(json.dumps(config).encode())
    layers = [*base_manifest["layers"], {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                        "digest": f"sha256:{layer_digest}", "size": layer.stat().st_size}]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": config_size},
                "layers": layers}
    manifest_digest, manifest_size = put(json.dumps(manifest).encode())
    (out / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
         "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))


def line(label: str, layers: int | str, pull: float | str, run: float | str, total: float, baseline: float) -> str:
    cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in (pull, run)]
    return f"  {label:42s} {str(layers):>6s} {cells[0]:>7s} {cells[1]:>6s} {total:8.1f} {total / baseline:7.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="python/numpy/scipy/pandas/matplotlib")
    parser.add_argument("--repeat", type=int, default=2, help="warm pulls per contender (the best is shown)")
    args = parser.parse_args()
    image = args.image
    argv = first_run(image)

    with tempfile.TemporaryDirectory(prefix="condery-bench-pull-") as tmp:
        work = Path(tmp)
        channel = build_realistic_channel(work / "channel")
        base = glibc_base_layout()
        base_layers = {digest for digest, _ in layer_digests(base, "bookworm")}
        (work / "distribution").mkdir()
        distribution = _start_registry(work / "distribution", None)
        figures: dict[str, tuple[int, float, float]] = {}
        try:
            (work / "c").mkdir()
            with condery(work / "c", [str(channel)], f"oci:{base}:bookworm", env={"PYTHONPATH": str(ROOT)}) as reg:
                skopeo_copy(f"{reg.host}/condery-empty:latest", work / "warmup", "latest")  # the base imported
                ref = f"{reg.host}/{image}:latest"
                cold = pull_and_run(work, ref, argv)
                warm = best(work, ref, argv, args.repeat)
                pulled = skopeo_copy(ref, work / "pulled", "latest")
                layers = len(layer_digests(pulled, "latest"))
                figures["condery, cold registry"] = (layers, *cold)
                figures["condery, warm registry"] = (layers, *warm)
                with urllib.request.urlopen(f"{reg.url}/api/v1/images/{image}/latest", timeout=600) as answer:
                    api_json = json.loads(answer.read())
            distribution.push(pulled, "condery-copy", "latest")
            figures["condery's layers from docker-registry"] = (
                layers, *best(work, f"{distribution.host}/condery-copy:latest", argv, args.repeat))

            for label, extra in (("condery, layer_budget 12", {"layer_budget": 12}),
                                 ("condery, zstd layers", {"layer_compression": "zstd"})):
                store = work / label.replace(" ", "-").replace(",", "")
                store.mkdir()
                with condery(store, [str(channel)], f"oci:{base}:bookworm", env={"PYTHONPATH": str(ROOT)},
                             **extra) as reg:
                    ref = f"{reg.host}/{image}:latest"
                    pull_and_run(work, ref, argv)  # builds it
                    count = len(layer_digests(skopeo_copy(ref, store / "oci", "latest"), "latest"))
                    figures[label] = (count, *best(work, ref, argv, args.repeat))

            records = solved_records(channel, image, api_json)
            build = work / "dockerfile"
            started = time.perf_counter()
            asyncio.run(install_records(records, build / "rootfs", cache_dir=build / "pkgs"))
            pack_layer(build / "rootfs", build / "layer.tar.gz", ["gzip", "-6", "-n"])
            built_s = time.perf_counter() - started
            one_layer_image(pulled, base, build / "layer.tar.gz", work / "one-layer")
            started = time.perf_counter()
            distribution.push(work / "one-layer", "one-layer", "latest")
            push_s = time.perf_counter() - started
            shutil.rmtree(build)
            one_ref = f"{distribution.host}/one-layer:latest"
            one_cold = pull_and_run(work, one_ref, argv)
            one_warm = best(work, one_ref, argv, args.repeat)
        finally:
            distribution.stop()

    base_count = len(base_layers)
    baseline = sum(one_warm)
    one_cold_total = built_s + push_s + sum(one_cold)
    print(f"pull-to-run of {image}: {len(records)} packages; podman pull (overlay storage, empty), "
          f"then python -c '{argv[2]}'")
    print(f"  seconds; ratios against the one-layer image's warm pull + run; layers include the base's {base_count}")
    print(f"  {'':42s} {'layers':>6s} {'pull':>7s} {'run':>6s} {'total':>8s} {'ratio':>8s}")
    for label, (count, pull_s, run_s) in figures.items():
        print(line(label, count, pull_s, run_s, pull_s + run_s, baseline))
    print(line("one layer (Dockerfile), warm", base_count + 1, *one_warm, baseline, baseline))
    print(line("one layer (Dockerfile), cold", base_count + 1, *one_cold, one_cold_total, baseline)
          + f"  (build {built_s:.1f} s + push {push_s:.1f} s + pull + run)")
    cold = figures["condery, cold registry"]
    print(f"  cold: condery {cold[1] + cold[2]:.1f} s / Dockerfile build + push + pull + run {one_cold_total:.1f} s"
          f" = {(cold[1] + cold[2]) / one_cold_total:.2f}x")
    warm = figures["condery, warm registry"]
    print(f"  warm: condery {warm[1] + warm[2]:.1f} s / one layer {baseline:.1f} s = {(warm[1] + warm[2]) / baseline:.2f}x")

if __name__ == "__main__":
    main()
