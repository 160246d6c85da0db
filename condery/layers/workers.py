"""Package layers written in worker processes: one per core, started once.

A streamed layer (layers/stream_job.py) is Python work: tar headers, the member check
over every file, the conda-meta record. In the server's own threads it shares one GIL
with the event loop that coordinates every other package's download, store writes and
records, so two CPU slots never gave two cores, and every thread handing the GIL on
cost futex calls (strace on a cold build of 300 small packages: 175,000 of them). In
worker processes each layer has a core to itself and the server keeps its GIL for the
coordination.

The processes are started on the first job (or by `warm`, which `condery serve` calls at
start), not per package, from the event loop's thread. Each arms PR_SET_PDEATHSIG
(common/children.py): a SIGKILLed server takes its workers with it, as it does every
child, instead of leaving them writing into its staging directory. A worker that dies
(the OOM killer) breaks the pool: the job that saw it raises WorkerLost, the pool is
made again for the next job, and the caller builds that package in a thread instead.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, TypeVar

from condery.common.children import die_with_parent

log = logging.getLogger("condery.layers")
_T = TypeVar("_T")


class WorkerLost(Exception):
    """The worker process running a job died; the job did not finish."""


def _initialize(parent: int, preload: tuple[str, ...]) -> None:
    die_with_parent(parent)
    # Ctrl-C in a terminal goes to the whole process group: the server stops its workers
    # itself (close), they must not print a KeyboardInterrupt each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The jobs' modules (rattler, the compressors...) imported now, at the worker's start,
    # not by its first job: that was 0.1 s more for the first image after a start.
    for module in preload:
        importlib.import_module(module)


def _ready() -> int:
    return os.getpid()


def _clean_up(abandoned: Callable[[Any], None], future: Future) -> None:
    """An abandoned job's result to `abandoned` (in the pool's thread, when it ends)."""
    if future.cancelled() or future.exception() is not None:
        return
    try:
        abandoned(future.result())
    except Exception:  # a cleanup that fails leaves litter for the start-up cleanup
        log.warning("could not clean up after an abandoned layer job", exc_info=True)


class LayerWorkers:
    """A pool of `processes` worker processes for blocking, picklable layer jobs."""

    def __init__(self, processes: int, preload: tuple[str, ...] = ()) -> None:
        if processes < 1:
            raise ValueError(f"layer workers must be at least 1, not {processes}")
        self.processes = processes
        self._preload = preload  # modules each worker imports when it starts
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the server has threads (and a loop) that a fork would copy
            # in whatever state they were in.
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_initialize, initargs=(os.getpid(), self._preload),
            )
        return self._pool

    async def run(self, fn: Callable[..., _T], *args: Any,
                  abandoned: Callable[[_T], None] | None = None) -> _T:
        """`fn(*args)` in a worker process. Raises what `fn` raises, or WorkerLost.

        A job that has started cannot be stopped: when the caller is cancelled (its build
        timed out or was abandoned), the job runs on, and `abandoned` gets its result when
        it ends, to remove what it left (a layer file nobody will store)."""
        pool = self._executor()
        try:
            future = pool.submit(fn, *args)
        except BrokenProcessPool:
            self._lost(pool)
            raise WorkerLost from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if abandoned is not None:
                future.add_done_callback(functools.partial(_clean_up, abandoned))
            raise
        except BrokenProcessPool:
            self._lost(pool)
            raise WorkerLost from None

    def _lost(self, pool: ProcessPoolExecutor) -> None:
        if self._pool is pool:
            log.warning("a layer worker process died; starting new ones")
            self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)

    async def warm(self) -> None:
        """Start every worker now (each imports condery's layer modules once), so that the
        first build does not wait for them."""
        try:
            await asyncio.gather(*(self.run(_ready) for _ in range(self.processes)))
        except WorkerLost:
            pass  # the first job starts them again

    def pids(self) -> list[int]:
        """The worker processes' ids (for tests and diagnostics)."""
        pool = self._pool
        processes = getattr(pool, "_processes", None) or {}
        return sorted(processes)

    def shutdown(self) -> None:
        """Stop the workers once their current jobs end (blocking); queued jobs are cancelled."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)
