"""What one image build did, for its two log lines and the build metrics.

A BuildReport is made when a build starts (one `build started` line), filled in by the
pipeline as it goes (solves, package layers built or reused, bytes downloaded and
stored, the time of each phase) and closed once (one `build ended` line with the result
and the reason of a failure, and the metrics moved). One report per image build: a pull
that joins a build in flight joins its report too, and adds no line.

Phases run in parallel (platforms, packages), so a phase's time is the wall time during
which at least one piece of it ran: the length of the union of its intervals, never
more than the build's own time.

    solve      the solver, per platform
    fetch      package downloads (their slot held; waiting for a slot is not counted)
    layers     install, tar and gzip of the package layers (their CPU slot held)
    manifests  grouping, the environment layer, config and manifests, the index

Within `layers` (and just after it), the steps of a package layer build, for where a cold
build's time goes (bench/bench_scale.py prints them):

    verify     the archive's sha256 against the repodata (inside `fetch`)
    check      the archive's members against its declaration (layers/members.py)
    install    rattler's extraction and linking into the staging directory
    pack       scrub, prune, then tar, compress and hash into the layer file
    store      the layer file into the store (a rename, or an upload)
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from condery.observability.logs import event
from condery.observability.metrics import Metrics

log = logging.getLogger("condery.build")
PHASES = ("solve", "fetch", "layers", "manifests")
STEPS = ("verify", "check", "install", "bytecode", "pack", "store")


def union_seconds(spans: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


@dataclass
class BuildReport:
    name: str
    tag: str
    platforms: tuple[str, ...]
    metrics: Metrics | None = None
    started: float = field(default_factory=time.monotonic)
    packages: int = 0  # solved packages, summed over platforms
    layers_built: int = 0
    layers_reused: int = 0
    bytes_stored: int = 0  # layers written to the store by this build (compressed)
    download_bytes: int = 0
    spans: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    solve_times: list[float] = field(default_factory=list)
    ended: bool = False

    @classmethod
    def start(cls, name: str, tag: str, platforms: Sequence[str], metrics: Metrics | None) -> "BuildReport":
        report = cls(name, tag, tuple(platforms), metrics)
        event(log, logging.INFO, "build started", name=name, tag=tag, platforms=report.platforms)
        return report

    # -- filled in by the pipeline ------------------------------------------------
    def span(self, phase: str, started: float, ended: float | None = None) -> None:
        """Record that `phase` ran from `started` until `ended` or now (time.monotonic(),
        one clock for every process on the host: a worker process's steps count too)."""
        self.spans[phase].append((started, time.monotonic() if ended is None else ended))

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.span(phase, started)

    def solved(self, packages: int, started: float) -> None:
        self.packages += packages
        self.solve_times.append(time.monotonic() - started)

    def layer(self, built: bool, size: int) -> None:
        if built:
            self.layers_built += 1
            self.bytes_stored += size
        else:
            self.layers_reused += 1

    def stored(self, size: int) -> None:
        """A blob other than a package layer written by this build (the environment layer)."""
        self.bytes_stored += size

    def downloaded(self, size: int) -> None:
        self.download_bytes += size

    def phase_seconds(self) -> dict[str, float]:
        return {phase: union_seconds(self.spans.get(phase, ())) for phase in (*PHASES, *STEPS)}

    # -- the end --------------------------------------------------------------
    def finish(self, error: str | None = None, skipped: Mapping[str, str] | None = None) -> None:
        """Log the `build ended` line and move the metrics; only the first call counts."""
        if self.ended:
            return
        self.ended = True
        seconds = time.monotonic() - self.started
        result = "failed" if error else "ok"
        phases = {f"{phase}_s": value for phase, value in self.phase_seconds().items()}
        fields = dict(
            result=result, name=self.name, tag=self.tag, platforms=self.platforms, packages=self.packages,
            layers_built=self.layers_built, layers_reused=self.layers_reused, bytes_stored=self.bytes_stored,
            download_bytes=self.download_bytes, duration_s=seconds, **phases,
        )
        if skipped:
            fields["skipped"] = sorted(skipped)  # platforms left out: each was logged with its reason
        if error:
            fields["reason"] = error
        event(log, logging.WARNING if error else logging.INFO, "build ended", **fields)
        if self.metrics is None:
            return
        m = self.metrics
        m.builds.labels(result).inc()
        m.build_duration.observe(seconds)
        m.layers.labels("built").inc(self.layers_built)
        m.layers.labels("reused").inc(self.layers_reused)
        m.layer_bytes.inc(self.bytes_stored)
        m.download_bytes.inc(self.download_bytes)
        for solve_seconds in self.solve_times:
            m.solve_duration.observe(solve_seconds)
