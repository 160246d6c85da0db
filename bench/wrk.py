"""HTTP load from `wrk` (Debian's wrk 4.1), the warm benchmarks' one load generator.

A C load generator rather than a Python client: the server under test, not the client,
must be what saturates the shared cores, and every server (condery, CNCF Distribution,
nginx) is measured by the same tool.

    load = wrk_load("http://127.0.0.1:5000/v2/x/manifests/latest", accept=OCI_MANIFEST)
    print(load.rps, load.p50_ms, load.p99_ms, load.mb_per_s)
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}  # -> milliseconds
_SIZES = {"B": 1 / (1 << 20), "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}  # -> MiB


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    mb_per_s: float  # MiB of responses (headers and bodies) per second


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> Load:
    """The figures of `wrk --latency` output; raises if any answer was not 2xx/3xx."""
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        raise RuntimeError(f"{m.group(1)} answers were errors:\n{output}")
    if m := re.search(r"Socket errors: .*", output):
        raise RuntimeError(f"wrk saw socket errors ({m.group(0)}):\n{output}")
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (done and rps and transfer and p50 and p99):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return Load(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        mb_per_s=float(transfer.group(1)) * _SIZES[transfer.group(2)],
    )


def wrk_load(url: str, *, accept: str | None = None, seconds: float = 5.0, connections: int = 16,
             threads: int = 2) -> Load:
    """`seconds` of GETs of `url` over `connections` keep-alive connections."""
    argv = ["wrk", "--latency", "-t", str(min(threads, connections)), "-c", str(connections),
            "-d", f"{seconds:g}s", "--timeout", "30s"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=True, timeout=seconds + 60)
    return parse_wrk(out.stdout)
