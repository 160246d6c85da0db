"""Streamed package layers written in worker processes (condery/layers/workers.py): the
same bytes as in a thread of the server, the build report's steps kept, a dead worker
replaced (its package built in a thread meanwhile), and no worker outliving a killed
server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import rattler

from condery.layers.package_layer import build_package_layer
from condery.layers.workers import LayerWorkers, WorkerLost
from condery.observability.build_report import BuildReport
from tests.fixtures.channel import ANACONDA_2020
from tests.fixtures.condapkg import index_channel
from tests.fixtures.procs import running
from tests.test_e2e import serve
from tests.test_stream_layer import records_of

PREFIX = "/opt/conda"


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real linux-64 packages of Anaconda 2020 (placeholders, softlinks, activation scripts)."""
    ch = tmp_path_factory.mktemp("workers-channel")
    for subdir in ("linux-64", "noarch"):
        (ch / subdir).mkdir()
    for archive in sorted((ANACONDA_2020 / "linux-64").glob("*.conda")):
        shutil.copyfile(archive, ch / "linux-64" / archive.name)
    index_channel(ch)
    return ch


@pytest.fixture
def workers() -> Iterator[LayerWorkers]:
    pool = LayerWorkers(2)
    yield pool
    pool.shutdown()


async def build(record: rattler.RepoDataRecord, tmp: Path, workers: LayerWorkers | None,
                report: BuildReport | None = None):
    return await build_package_layer(record, python_record=None, prefix=PREFIX, platform="linux-64",
                                     work_dir=tmp / "work", package_cache_dir=tmp / "pkgs", report=report,
                                     workers=workers)


async def test_a_layer_from_a_worker_is_the_layer_from_a_thread(channel: Path, tmp_path: Path,
                                                                 workers: LayerWorkers) -> None:
    report = BuildReport.start("test", "latest", ["linux-64"], None)
    records = [r for r in records_of(channel) if not r.noarch.python]
    assert len(records) >= 20
    for record in records:
        in_worker = await build(record, tmp_path, workers, report)
        in_thread = await build(record, tmp_path, None)
        assert (in_worker.digest, in_worker.diff_id, in_worker.size, in_worker.scripts) == \
            (in_thread.digest, in_thread.diff_id, in_thread.size, in_thread.scripts), record.file_name
        assert in_worker.path.read_bytes() == in_thread.path.read_bytes()
        in_worker.path.unlink()
        in_thread.path.unlink()
    # One job at a time: one worker was enough (more start when jobs wait).
    assert 1 <= len(workers.pids()) <= 2 and os.getpid() not in workers.pids()
    # The worker's steps reach the build report (one clock for every process).
    phases = report.phase_seconds()
    assert phases["check"] > 0 and phases["pack"] > 0, phases
    # Nothing left in the work directory: spools and layer files are the caller's or gone.
    assert not [p for p in (tmp_path / "work").iterdir() if not p.name.startswith(".stage-")]


async def test_a_job_that_kills_its_worker_raises_worker_lost(workers: LayerWorkers) -> None:
    with pytest.raises(WorkerLost):
        await workers.run(os._exit, 3)
    # The next job gets a new pool.
    assert await workers.run(os.getpid) != os.getpid()


def write_after(path: str, delay: float) -> str:
    time.sleep(delay)
    Path(path).write_text("a layer nobody will store")
    return path


async def test_an_abandoned_job_is_cleaned_up_when_it_ends(tmp_path: Path, workers: LayerWorkers) -> None:
    """A started job cannot be stopped: when its caller is cancelled, what it leaves is
    removed once it ends (a build that timed out must not leave its layer file behind)."""
    await workers.warm()
    left = tmp_path / "layer.tar.gz"
    cleaned: list[str] = []

    def discard(path: str) -> None:
        Path(path).unlink()
        cleaned.append(path)

    job = asyncio.ensure_future(workers.run(write_after, str(left), 1.0, abandoned=discard))
    await asyncio.sleep(0.3)  # running in a worker by now
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    deadline = time.monotonic() + 10
    while not cleaned and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert cleaned == [str(left)] and not left.exists()  # the job ended, its file went
    assert await workers.run(os.getpid) in workers.pids()  # the pool carries on


async def test_a_killed_worker_is_replaced_and_its_package_built_in_a_thread(
        channel: Path, tmp_path: Path, workers: LayerWorkers, caplog: pytest.LogCaptureFixture) -> None:
    await workers.warm()
    killed = workers.pids()
    assert len(killed) == 2
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    record = next(r for r in records_of(channel) if r.name.normalized == "xz")
    with caplog.at_level(logging.WARNING, logger="condery.layers"):
        blob = await build(record, tmp_path, workers)  # the pool is broken: built in a thread
    assert "a layer worker process died" in caplog.text
    again = await build(record, tmp_path, workers)  # new workers
    assert (again.digest, again.diff_id) == (blob.digest, blob.diff_id)
    assert workers.pids() and not set(workers.pids()) & set(killed)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
def test_no_worker_outlives_a_killed_server(tmp_path: Path, fixture_channel: Path) -> None:
    argv, _, port = serve(tmp_path, [str(fixture_channel)], "scratch")
    url = f"http://127.0.0.1:{port}"
    with running(argv, url=url + "/v2/", log_path=tmp_path / "condery.log", timeout=60) as server:
        request = urllib.request.Request(f"{url}/v2/xz/manifests/latest",
                                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            assert json.loads(answer.read())["layers"]
        workers = [pid for pid in children(server.pid)
                   if b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) >= 2, children(server.pid)
        server.send_signal(signal.SIGKILL)
        server.wait()
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)]
