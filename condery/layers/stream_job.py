"""One streamed package layer as a job: plain data in, plain data out, blocking.

stream_layer.py knows how a layer is planned and written from an archive; this module is
the whole of one package's streamed build around it (read, plan, scrub the record,
compile the modules, write), in one call that needs nothing of the server: no event
loop, no rattler record, no report object. So it runs the same in a worker process
(layers/workers.py, where it escapes the server's GIL) or in a thread of the server.

It raises only NotStreamable (the caller installs the package with rattler, which gives
the layer or the verdict) and PackageUnavailable (the host could not compile the
package's modules now): exceptions that pickle whole.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from condery.layers import LayerBlob, PackageError, PackageUnavailable
from condery.layers.activation_scripts import PackageScripts, scripts_from_paths, wanted_scripts
from condery.layers.bytecode import BytecodePlan, compile_bytecode
from condery.layers.conda_meta import contains_path, scrub_record
from condery.layers.members import PackageLimits
from condery.layers.stream_layer import (
    ArchiveRead,
    NotStreamable,
    PackageIdentity,
    Spool,
    StreamPlan,
    add_compiled,
    open_spool,
    plan_layer,
    read_archive,
    write_plan,
    write_scratch_sources,
)
from condery.layers.tarball import TreeOwner

# What a package this module did not foresee raises (a bug of ours, not a verdict on the
# package): declined as NotStreamable(unforeseen=True), and rattler's install decides.
_UNFORESEEN = (KeyError, TypeError, ValueError, AttributeError, IndexError, UnicodeError)


@dataclass(frozen=True)
class StreamJob:
    package: PackageIdentity
    archive: Path  # the verified archive in the package cache
    work_dir: Path  # where the spool and the layer file go
    prefix: str
    limits: PackageLimits
    bytecode: BytecodePlan | None
    compression: str
    owner: TreeOwner | None = None


@dataclass
class StreamOutcome:
    blob: LayerBlob  # its `scripts` set: the package's part in activation
    # (step, started, ended) in time.monotonic(), one clock for every process on the host:
    # the build report's check/bytecode/pack steps (observability/build_report.py).
    spans: list[tuple[str, float, float]] = field(default_factory=list)


def build_streamed(job: StreamJob) -> StreamOutcome:
    """The package's layer written straight from its archive, in `job.work_dir`."""
    spans: list[tuple[str, float, float]] = []

    @contextmanager
    def timed(step: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            spans.append((step, started, time.monotonic()))

    spool = open_spool(job.work_dir)
    fd, out_name = tempfile.mkstemp(dir=job.work_dir, prefix=f"{job.package.dist}-", suffix=".tar.gz")
    os.close(fd)
    out_path = Path(out_name)
    try:
        try:
            with timed("check"):
                plan, scripts = _read_and_plan(job, spool)
            if plan.sources and job.bytecode is not None:
                with timed("bytecode"):
                    _compile(job, plan, spool)
            with timed("pack"):
                blob = write_plan(plan, spool, out_path, job.compression, job.owner)
            return StreamOutcome(replace(blob, scripts=scripts), spans)
        except PackageUnavailable as exc:
            raise PackageUnavailable(str(exc)) from None  # without its cause: it pickles whole
        except PackageError as exc:
            raise NotStreamable(str(exc)) from None  # the install gives the verdict
        except _UNFORESEEN as exc:
            raise NotStreamable(f"{type(exc).__name__}: {exc}", unforeseen=True) from None
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    finally:
        spool.close()


def _read_and_plan(job: StreamJob, spool: Spool) -> tuple[StreamPlan, PackageScripts]:
    """The layer's plan (stream_layer.plan_layer), its record scrubbed, and the package's
    part in activation, from one reading of the archive."""
    read = read_archive(job.archive, job.limits, spool)
    plan = plan_layer(job.package, read, spool, prefix=job.prefix, bytecode=job.bytecode)
    scripts = _scripts_of(plan, read, spool)
    del read
    plan.record = scrub_record(plan.record, job.package)
    if contains_path(plan.record, (str(job.archive.parent), str(job.archive.parent.resolve()))):
        raise NotStreamable("the conda-meta record holds a local path")
    return plan, scripts


def _scripts_of(plan: StreamPlan, read: ArchiveRead, spool: Spool) -> PackageScripts:
    """What activation_scripts.read_package_scripts reads from the archive, from the reading
    the layer was planned from: paths.json's paths with their text placeholders (as the
    plan's conda-meta record holds them: paths.json parsed once), and the activation
    scripts' bytes as the archive holds them (placeholders not replaced)."""
    entries: list[tuple[str, str | None]] = []
    for raw in plan.record["paths_data"]["paths"]:
        text = raw.get("prefix_placeholder") if raw.get("file_mode") == "text" else None
        entries.append((str(raw["_path"]), text))
    contents = {}
    for rel in wanted_scripts(rel for rel, _ in entries):
        spooled = read.files.get(rel)
        contents[rel] = spool.read(spooled.offset, spooled.size) if spooled is not None else None
    return scripts_from_paths(entries, contents)


def _compile(job: StreamJob, plan: StreamPlan, spool: Spool) -> None:
    """The modules the package ships without a pyc, compiled by the image's python into
    the plan (bytecode.compile_bytecode, from a scratch tree of just those sources).

    compile_bytecode is a coroutine (it waits on the compiler with a timeout): run here on
    a loop of this call's own. Its child dies with this thread's process (children.spawn)
    and is always stopped before the call returns, so the thread outlives it."""
    assert job.bytecode is not None
    scratch = Path(tempfile.mkdtemp(dir=job.work_dir, prefix=".pyc-src-"))
    try:
        target = scratch / "prefix"
        write_scratch_sources(plan, spool, target)
        compiled = asyncio.run(compile_bytecode(target, job.package.dist, job.bytecode, prefix=job.prefix,
                                                work_dir=scratch))
        add_compiled(plan, compiled, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
