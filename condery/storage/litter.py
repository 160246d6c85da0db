"""Crash litter: what a killed process leaves in staging areas, removed by age.

A build stages files (package installs, layer tarballs, downloads) next to where they
will be published, then renames them in. SIGKILL, OOM or a power cut between the two
leaves the staged files behind, and nothing else ever refers to them. They are
removed at start-up, but only once nothing has touched them for a long time: replicas
sharing the store (or the package cache) may be staging files there right now, and
the only thing a shared directory tells about its writers is modification times.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("condery.storage")

# An entry untouched for this long cannot belong to a live build: it is twice the
# default build timeout (1800 s), after which builds are abandoned. Deployments with a
# longer build_timeout get twice theirs (see stale_age).
STALE_AFTER = 3600.0


def stale_age(build_timeout: float) -> float:
    """How old staging must be before start-up removes it, for a given build timeout."""
    return max(STALE_AFTER, 2.0 * build_timeout)


def newest_mtime(path: Path) -> float:
    """The latest modification time of `path` and, for a directory, anything inside.

    A directory's own mtime changes only when entries are added or removed directly in
    it; a build writing deep inside a staging tree shows only in the deep entries.
    """
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    pass  # removed while we looked: the writer is alive, the max still holds
    return newest


def remove_stale(directory: Path, max_age: float, pattern: str = "*", now: float | None = None) -> int:
    """Remove the entries of `directory` matching `pattern` untouched for `max_age` s.

    Returns how many were removed. Failures are logged and skipped: cleaning is a
    courtesy at start-up and must never stop the registry from starting.
    """
    now = time.time() if now is None else now
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in directory.glob(pattern):
        try:
            if now - newest_mtime(entry) < max_age:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed += 1
        except FileNotFoundError:
            continue  # another replica cleaned it first
        except OSError as exc:
            log.warning("cannot remove stale staging entry %s: %s", entry.name, exc.strerror)
    return removed
