"""Benchmark: a pushed environment.yml with conda and pip packages, cold and warm, beside
the Dockerfile a user would write for it.

    python3 bench/bench_environments.py

The file: python, numpy, scipy, pandas, matplotlib (their PyPI wheels repackaged as conda
packages, tests/fixtures/wheel_packages.py) plus three pip packages (pyyaml, attrs, idna)
from a loopback simple index of real wheels (tests/fixtures/simple_index.py), offline.

1. condery: `POST /api/v1/environments`, then `skopeo copy` of `env/<id>` from a
   `condery serve` with an empty store and package cache (the base imported, as a
   Dockerfile's FROM is already pulled); then the same pull warm.
2. A second file with the same conda packages and other pip packages (jmespath,
   prometheus-client):
   what it builds (it should add only its pip layers: condery_layers_total{result="built"}).
3. The Dockerfile: `micromamba create -f environment.yml && pip install ...` then the
   engine's `tar | gzip -6` (and pigz on every core). micromamba is not installable here
   (conda channels only), so its install is py-rattler's (the library micromamba's
   successor tools use, and what bench/baselines.py measures for every bench), followed by
   `pip install --no-deps` of the same wheels into the environment's site-packages, from
   the same index. Each from a fresh cache.

Printed: seconds and ratios (target: condery cold <= 0.5x the gzip Dockerfile), the warm
pull, and the layers the second file built.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import compressors, install_records, pack_layer, ratio_line  # noqa: E402
from bench.bench_realistic import layer_digests, solved_records  # noqa: E402
from tests.fixtures.base_image import glibc_base_layout  # noqa: E402
from tests.fixtures.clients import skopeo_copy  # noqa: E402
from tests.fixtures.python_package import python_version  # noqa: E402
from tests.fixtures.simple_index import SimpleIndex, serve_index, wheelhouse  # noqa: E402
from tests.fixtures.wheel_packages import build_realistic_channel  # noqa: E402
from tests.test_e2e import condery  # noqa: E402

CONDA = ("python", "numpy", "scipy", "pandas", "matplotlib")
PIP = ("pyyaml", "attrs", "idna")
PIP_SECOND = ("jmespath", "prometheus-client")  # none of them a conda package of the image


def environment(channel: str, pip: tuple[str, ...]) -> str:
    major_minor = ".".join(python_version().split(".")[:2])
    conda = [f"python={major_minor}", *CONDA[1:]]
    return (f"name: bench\nchannels: [{channel}]\ndependencies:\n" + "".join(f"  - {c}\n" for c in conda)
            + "  - pip:\n" + "".join(f"      - {p}\n" for p in pip))


def push(url: str, text: str) -> dict:
    request = urllib.request.Request(f"{url}/api/v1/environments", data=text.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.loads(answer.read())


def layers_built(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=60) as answer:
        text = answer.read().decode()
    found = re.search(r'^condery_layers_total\{result="built"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def pip_baseline(records, wheels: list[Path], work: Path, label: str, compressor: list[str]) -> tuple[float, int]:
    """rattler install + pip install of the wheels + tar | compressor: (seconds, layer bytes)."""
    root = work / "rootfs"
    install_s = asyncio.run(install_records(records, root, cache_dir=work / "pkgs"))
    site = next((root / "opt/conda/lib").glob("python3.*/site-packages"))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--no-index", "--target", str(site), *map(str, wheels)], check=True)
    pip_s = time.perf_counter() - started
    pack_s, _ = pack_layer(root, work / "layer.tar.gz", compressor)
    size = (work / "layer.tar.gz").stat().st_size
    subprocess.run(["rm", "-rf", str(work)], check=True)
    print(f"    {label}: install {install_s:.2f} s + pip {pip_s:.2f} s + pack {pack_s:.2f} s")
    return install_s + pip_s + pack_s, size


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="condery-bench-env-") as tmp:
        work = Path(tmp)
        channel = build_realistic_channel(work / "channel")
        base = glibc_base_layout()
        base_layers = {digest for digest, _ in layer_digests(base, "bookworm")}
        index = SimpleIndex()
        for path in sorted(wheelhouse().glob("*.whl")):
            index.add(path)
        for package in channel.rglob("*.conda"):
            package.read_bytes()  # the same warm page cache for condery and the baselines
        (work / "condery").mkdir()
        with serve_index(index), condery(work / "condery", [str(channel)], f"oci:{base}:bookworm",
                                         env={"PYTHONPATH": str(ROOT)}, pypi_index=index.url) as registry:
            skopeo_copy(f"{registry.host}/condery-empty:latest", work / "warmup", "latest")  # imports the base
            started = time.perf_counter()
            answer = push(registry.url, environment(channel.name, PIP))
            skopeo_copy(answer["pull"], work / "cold", "latest")
            cold_s = time.perf_counter() - started
            started = time.perf_counter()
            skopeo_copy(answer["pull"], work / "warm", "latest")
            warm_s = time.perf_counter() - started
            with urllib.request.urlopen(f"{registry.url}/api/v1/images/{answer['name']}/latest", timeout=600) as got:
                api_json = json.loads(got.read())
            before = layers_built(registry.url)
            started = time.perf_counter()
            second = push(registry.url, environment(channel.name, PIP_SECOND))
            skopeo_copy(second["pull"], work / "second", "latest")
            second_s = time.perf_counter() - started
            second_built = layers_built(registry.url) - before
            with urllib.request.urlopen(f"{registry.url}/api/v1/images/{second['name']}/latest", timeout=600) as got:
                second_pip = json.loads(got.read())["platforms"]["linux-64"]["pip"]
        layers = [(d, s) for d, s in layer_digests(work / "cold", "latest") if d not in base_layers]
        condery_bytes = sum(size for _, size in layers)
        pinned = api_json["platforms"]["linux-64"]["pip"]
        wheels = [next(p for p in wheelhouse().glob("*.whl") if p.name == w["url"].rsplit("/", 1)[1]) for w in pinned]
        records = solved_records(channel, "/".join(CONDA), api_json)
        results = {label: pip_baseline(records, wheels, work / f"baseline-{i}", label, argv)
                   for i, (label, argv) in enumerate(compressors().items())}

    (gzip_label, (gzip_s, gzip_bytes)), (pigz_label, (pigz_s, _)) = results.items()
    mb = 1e6
    print(f"environment.yml: {len(records)} conda packages + {len(pinned)} pip wheels "
          f"({', '.join(w['name'] for w in pinned)})")
    print(ratio_line("condery cold (push + skopeo copy, empty store)", cold_s, gzip_s, target="<= 0.50x gzip"))
    print(ratio_line(f"Dockerfile: install + pip install + tar | {gzip_label}", gzip_s, gzip_s))
    print(ratio_line(f"Dockerfile: install + pip install + tar | {pigz_label}", pigz_s, gzip_s))
    print(f"  condery cold / pigz Dockerfile: {cold_s / pigz_s:.2f}x")
    print(ratio_line("condery warm (skopeo copy again)", warm_s, gzip_s))
    print(ratio_line(f"condery, {len(layers)} layers (MB)", condery_bytes / mb, gzip_bytes / mb, "MB",
                     target="<= 1.03x"))
    print(f"second file (same conda packages, pip {', '.join(w['name'] for w in second_pip)}): "
          f"{second_s:.2f} s, {second_built:.0f} layers built "
          f"(only its {len(second_pip)} wheels': {'pass' if second_built == len(second_pip) else 'FAIL'}; "
          "the environment layer is written for every image and not counted)")


if __name__ == "__main__":
    main()
