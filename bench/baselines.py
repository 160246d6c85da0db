"""The cold baselines every build benchmark compares condery with, in one place.

A hand-written conda Dockerfile (`FROM debian` + `RUN micromamba install ...`) costs an
install of the solved records into one directory, then the engine's layer commit: a tar
of that directory through `gzip -6`. The best a Dockerfile could do is the same with
`pigz` on every core. Both install from a fresh package cache, so they fetch from the
channel just as a cold condery build does.

    records = await service.solve(...)          # the very records condery builds
    for result in await dockerfile_baselines(records, work):
        print(result.label, result.seconds, result.layer_bytes)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import rattler

PREFIX = "/opt/conda"  # condery's default prefix, so placeholders get the same bytes


def compressors() -> dict[str, list[str]]:
    """label -> argv reading a tar on stdin; `-n` leaves name and time out of the header."""
    cores = os.cpu_count() or 1
    return {
        "gzip -6": ["gzip", "-6", "-n"],
        f"pigz -6 -p{cores}": ["pigz", "-6", "-n", "-p", str(cores)],
    }


@dataclass(frozen=True)
class Baseline:
    label: str  # the compressor, e.g. "gzip -6"
    seconds: float  # install + pack: what the Dockerfile build costs
    install_seconds: float
    pack_seconds: float  # tar | compressor
    layer_bytes: int  # the compressed layer
    tar_bytes: int  # the uncompressed layer (its diff)


async def install_records(
    records: Sequence[rattler.RepoDataRecord], root: Path, *, cache_dir: Path, prefix: str = PREFIX
) -> float:
    """Install `records` at root/<prefix> as if at `prefix`; return the seconds it took."""
    started = time.perf_counter()
    await rattler.install(
        list(records),
        root / prefix.lstrip("/"),
        cache_dir=cache_dir,
        show_progress=False,
        platform=rattler.Platform("linux-64"),
        alternative_target_prefix=prefix,
    )
    return time.perf_counter() - started


def pack_layer(root: Path, out: Path, compressor: Sequence[str]) -> tuple[float, int]:
    """`tar -C root -cf - . | compressor > out`; return (seconds, uncompressed tar bytes)."""
    started = time.perf_counter()
    with open(out, "wb") as sink:
        tar = subprocess.Popen(["tar", "-C", str(root), "-cf", "-", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        # Count the tar bytes on the way through: the diff size, without a second pass.
        squeeze = subprocess.Popen(list(compressor), stdin=subprocess.PIPE, stdout=sink)
        assert squeeze.stdin is not None
        tar_bytes = 0
        while chunk := tar.stdout.read(1 << 20):
            tar_bytes += len(chunk)
            squeeze.stdin.write(chunk)
        squeeze.stdin.close()
        if tar.wait() != 0 or squeeze.wait() != 0:
            raise RuntimeError(f"tar | {' '.join(compressor)} failed")
    return time.perf_counter() - started, tar_bytes


async def dockerfile_baseline(
    records: Sequence[rattler.RepoDataRecord], work: Path, label: str, compressor: Sequence[str]
) -> Baseline:
    """One cold Dockerfile build of `records` in `work` (created, then removed)."""
    work.mkdir(parents=True)
    try:
        root = work / "rootfs"
        install_s = await install_records(records, root, cache_dir=work / "pkgs")
        pack_s, tar_bytes = pack_layer(root, work / "layer.tar.gz", compressor)
        layer_bytes = (work / "layer.tar.gz").stat().st_size
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()  # the next contender starts with nothing of this one left to write back
    return Baseline(label, install_s + pack_s, install_s, pack_s, layer_bytes, tar_bytes)


async def dockerfile_baselines(records: Sequence[rattler.RepoDataRecord], work: Path) -> list[Baseline]:
    """gzip -6 then pigz on all cores, each from a fresh package cache."""
    results = []
    for index, (label, argv) in enumerate(compressors().items()):
        results.append(await dockerfile_baseline(records, work / f"baseline-{index}", label, argv))
    return results


def ratio_line(label: str, value: float, baseline: float, unit: str = "s", target: str = "") -> str:
    """One aligned report line: `label  value unit  ratio x  (target)`."""
    suffix = f"  (target {target})" if target else ""
    return f"  {label:50s} {value:12.2f} {unit:2s}  {value / baseline:6.2f}x{suffix}"
