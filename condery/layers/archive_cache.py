"""The local package archive cache, capped by size: least recently used archives go first.

Archives live in `<package_cache>/archives/<sha256>/<file name>` (package_layer.py); a
cache hit touches the archive, so its directory's newest mtime says when it was last
used (atime is unreliable: relatime and noatime mounts). Whole `<sha256>/` directories
are removed, never a file out of one. A directory used within `in_use` seconds, or with
a download in progress, stays even past the cap: a build may be about to read it, and
the cap is a bound to come back under, not a wall.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger("condery.layers")
IN_USE_SECONDS = 300.0


def _scan(directory: Path) -> tuple[int, float, bool]:
    """(bytes, last use, downloading) of one archive directory."""
    size, used, downloading = 0, 0.0, False
    with os.scandir(directory) as entries:
        for entry in entries:
            stat = entry.stat(follow_symlinks=False)
            size += stat.st_size
            used = max(used, stat.st_mtime)
            downloading = downloading or entry.name.startswith(".download-")
    return size, used, downloading


def cap_archive_cache(package_cache_dir: Path, max_bytes: int, *, in_use: float = IN_USE_SECONDS,
                      now: float | None = None) -> tuple[int, int]:
    """Remove least recently used archive directories until the cache holds at most
    `max_bytes`; returns (directories removed, bytes freed)."""
    now = time.time() if now is None else now
    root = Path(package_cache_dir) / "archives"
    found: list[tuple[float, int, Path, bool]] = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    try:
                        size, used, downloading = _scan(Path(entry.path))
                    except FileNotFoundError:
                        continue  # removed meanwhile (another process capping the same cache)
                    found.append((used, size, Path(entry.path), downloading))
    except FileNotFoundError:
        return 0, 0
    total = sum(size for _, size, _, _ in found)
    removed = freed = 0
    for used, size, path, downloading in sorted(found, key=lambda item: item[0]):
        if total <= max_bytes:
            break
        if downloading or now - used < in_use:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        removed += 1
        freed += size
    if removed:
        log.info("package cache: removed %d archives (%d bytes) to stay under %d bytes", removed, freed, max_bytes)
    return removed, freed
