"""Child processes that die with the server.

A SIGKILLed (or OOM-killed) `condery serve` runs no cleanup, so a child it started
(the bytecode compiler, a docker credential helper) would live on as an orphan: the
compiler keeps writing into the store's staging directory, and the next start's
age-based cleanup then keeps that fresh-looking litter. Every child condery starts goes
through `spawn`, which asks the kernel to SIGKILL the child when its parent goes
(`PR_SET_PDEATHSIG`), whatever the way the parent died.

Linux only. Where prctl cannot be found (another OS, a libc without it) children start
as they did before, without that guarantee.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Looked up here, once: the child between fork and exec must not load libraries or
# import modules (another thread of the server may have held the import lock, or a
# loader lock, at the moment of the fork, and the child would wait for it for ever).
_PRCTL = _find_prctl()


def _die_with(parent: int, prctl: Callable[..., int]) -> Callable[[], None]:
    """The preexec_fn: runs in the child after fork, before exec."""

    def arm() -> None:
        # A failing prctl (a seccomp filter refusing it) leaves the child as it was before
        # this module existed; refusing to start it would fail builds for a safety net.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The death signal is armed only from now on: a parent that died between fork and
        # prctl has already left this child to a reaper (init or a subreaper), and no
        # signal will ever come. The getppid check is the well-known way to close that race.
        if os.getppid() != parent:
            os._exit(1)

    return arm


def die_with_parent(parent: int) -> None:
    """Arm the death signal in this process, started by process `parent` (a worker
    pool's initializer: layers/workers.py); exit now if `parent` is already gone. The
    same rule as `spawn`'s: the signal comes when the parent's forking *thread* ends."""
    if _PRCTL is not None:
        _die_with(parent, _PRCTL)()


async def spawn(program: str, *args: str, **kwargs: Any) -> asyncio.subprocess.Process:
    """`asyncio.create_subprocess_exec(program, *args, **kwargs)`, the child killed when
    the server dies.

    PDEATHSIG fires when the *thread* that forked the child ends, not the process.
    asyncio forks in the event loop's thread (Popen runs there, only the waiting happens
    in a watcher thread), and condery's loop thread is the one `asyncio.run` runs in,
    which lives as long as the server. Calling this from a short-lived thread's own loop
    would kill the child when that thread ends.

    `start_new_session=True` stays the caller's choice (`stop` then kills the child's
    whole process group); the death signal goes to the child alone, and a grandchild
    of its own is the child's to look after. `preexec_fn` is this function's.

    A preexec_fn makes Popen fork rather than vfork: the page tables of the server are
    copied for each child, a cost that is small next to what condery's children do.
    """
    if "preexec_fn" in kwargs:
        raise TypeError("spawn sets preexec_fn itself")
    prctl = _PRCTL
    if prctl is not None:
        kwargs["preexec_fn"] = _die_with(os.getpid(), prctl)
    return await asyncio.create_subprocess_exec(program, *args, **kwargs)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Kill a child that has not ended (its whole process group when it leads one: started
    with `start_new_session=True`), and reap it. For the `finally` of every caller: a
    timeout, a cancelled build or a failed read must leave no child behind."""
    if proc.returncode is None:
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except ProcessLookupError:
            pass  # ended meanwhile; wait() reaps it
    await proc.wait()
