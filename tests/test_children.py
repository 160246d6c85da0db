"""condery.common.children: a child started through `spawn` dies with its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from condery.common import children

pytestmark = pytest.mark.skipif(children._PRCTL is None, reason="no prctl (not Linux)")

# Starts `sleep 1000` through spawn, prints its pid, then waits to be killed.
PARENT = """
import asyncio, sys, time
from condery.common.children import spawn

async def main() -> None:
    proc = await spawn("sleep", "1000", start_new_session=True)
    print(proc.pid, flush=True)
    time.sleep(1000)

asyncio.run(main())
"""


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (when it started), or None once the process is gone or a
    zombie: the pid of a process whose parent died is reaped by whoever adopted it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def survivors(started: dict[int, str], timeout: float = 10.0) -> list[int]:
    """The processes of `started` (pid: start time) still there after up to `timeout` s;
    a pid that now belongs to a process started later counts as gone."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid, when in started.items() if start_time(pid) == when]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def test_child_dies_with_a_sigkilled_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        started = start_time(child)
        assert started is not None and Path(f"/proc/{child}/cmdline").read_bytes() == b"sleep\x001000\x00"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert survivors({child: started}) == [], f"sleep ({child}) outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child and start_time(child) is not None:
            os.kill(child, signal.SIGKILL)  # only if the test already failed


def test_child_of_a_parent_that_died_before_prctl_exits_at_once() -> None:
    # As if the parent had died between fork and prctl: getppid is not the forker's pid.
    not_the_parent = os.getppid()
    arm = children._die_with(not_the_parent, children._PRCTL)
    result = subprocess.run(["sleep", "1000"], preexec_fn=arm, timeout=10, check=False)
    assert result.returncode == 1


def test_keyword_arguments_pass_through() -> None:
    async def run() -> tuple[bytes, int]:
        proc = await children.spawn("sh", "-c", "echo $X; pwd", env={"X": "kept"}, cwd="/",
                                    stdout=asyncio.subprocess.PIPE, start_new_session=True)
        out, _ = await proc.communicate()
        return out, proc.returncode

    assert asyncio.run(run()) == (b"kept\n/\n", 0)
    with pytest.raises(TypeError):
        asyncio.run(children.spawn("true", preexec_fn=lambda: None))


def test_without_prctl_the_child_starts_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(children, "_PRCTL", None)

    async def run() -> int:
        proc = await children.spawn("true")
        return await proc.wait()

    assert asyncio.run(run()) == 0


async def test_stop_kills_the_whole_group_of_a_child_in_its_own_session(tmp_path: Path) -> None:
    # The child starts a grandchild in its own group (what a compiler's worker would be)
    # and prints its pid; stop() must take both down, not only the child.
    script = "import subprocess, sys, time; g = subprocess.Popen(['sleep', '1000']); print(g.pid, flush=True); time.sleep(1000)"
    proc = await children.spawn(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    grandchild = int((await asyncio.wait_for(proc.stdout.readline(), 10)).decode())
    started = {pid: start_time(pid) for pid in (proc.pid, grandchild)}
    assert all(started.values())
    # Bounded: a grandchild left holding the pipe would keep wait() from returning.
    await asyncio.wait_for(children.stop(proc), 20)
    assert proc.returncode == -signal.SIGKILL
    assert survivors(started) == []  # type: ignore[arg-type]
    await children.stop(proc)  # a second stop of an ended child is a no-op
