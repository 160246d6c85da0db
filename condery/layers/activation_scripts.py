"""What a package brings to activation, read from its verified archive when its layer is
built, and kept in its layer record (records/schemas.py LayerEntry) so that an image built
from cached layers still knows it.

- its `etc/conda/activate.d/*.sh` and `etc/conda/deactivate.d/*.sh` scripts, as the
  archive holds them, with their text-mode prefix placeholder (`for_prefix` replaces it
  by the environment's prefix, as the install does);
- the names of its `bin/` programs: the sandbox puts a tripwire at each, so a script that
  runs a program of the image is seen doing it (layers/activation.py);
- a set of short digests of its paths (files and their directories): scripts test
  `[ -d "$CONDA_PREFIX/share/proj" ]` or `[ -f .../proj.db ]` on files of *other*
  packages (proj's script looks for proj-data's licence file), so every package keeps
  a compact answer to "is this path in the image?" without a file list in its record.
  Six bytes of sha256 per path: python's ~8,000 paths cost 64 KB of base64, and a false
  "present" has a chance of 2^-48 per lookup.

Nothing here runs what the package holds; the archive is read through py-rattler's
package_streaming (the info section always, the payload only when it has scripts).
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rattler import package_streaming

ACTIVATE_DIR = "etc/conda/activate.d"
DEACTIVATE_DIR = "etc/conda/deactivate.d"
_SCRIPT_NAME = re.compile(r"^[A-Za-z0-9._+@-]+\.sh$")
_PROGRAM_NAME = re.compile(r"^[A-Za-z0-9._+@-]+$")
MAX_SCRIPT_BYTES = 256 * 1024  # a bigger "activation script" is not one we evaluate
_DIGEST_BYTES = 6


def path_digest(kind: str, rel: str) -> bytes:
    """The short digest of a path relative to the prefix; kind "f" (a file or link) or "d"."""
    return hashlib.sha256(f"{kind}:{rel}".encode()).digest()[:_DIGEST_BYTES]


@dataclass(frozen=True)
class PackageScripts:
    """A package's part in activation (see the module docstring)."""

    activate: tuple[tuple[str, str, str], ...] = ()  # (file name in activate.d, text, placeholder or "")
    deactivate: tuple[tuple[str, str, str], ...] = ()
    programs: tuple[str, ...] = ()  # names in bin/
    path_digests: bytes = b""  # concatenated path_digest()s, sorted

    @staticmethod
    def for_prefix(scripts: Iterable[tuple[str, str, str]], prefix: str) -> list[tuple[str, str]]:
        """(name, text) with the placeholder replaced by `prefix`."""
        return [(name, text.replace(placeholder, prefix) if placeholder else text)
                for name, text, placeholder in scripts]

    def has_path(self, kind: str, rel: str) -> bool:
        return _contains(self.path_digests, path_digest(kind, rel))

    def as_record(self) -> dict[str, Any]:
        return {
            "activate": [list(s) for s in self.activate],
            "deactivate": [list(s) for s in self.deactivate],
            "programs": list(self.programs),
            "paths": base64.b64encode(self.path_digests).decode(),
        }

    @classmethod
    def from_record(cls, record: Any) -> PackageScripts:
        """Raises TypeError/ValueError on a malformed record (the caller reads that as a miss)."""
        if not isinstance(record, Mapping):
            raise TypeError("scripts: not an object")

        def scripts(value: Any) -> tuple[tuple[str, str, str], ...]:
            if not isinstance(value, list):
                raise TypeError("scripts: not a list")
            out = []
            for item in value:
                if (not isinstance(item, list) or len(item) != 3 or not all(isinstance(x, str) for x in item)
                        or not _SCRIPT_NAME.match(item[0])):
                    raise ValueError("scripts: malformed entry")
                out.append((item[0], item[1], item[2]))
            return tuple(out)

        programs = record["programs"]
        if not isinstance(programs, list) or not all(isinstance(p, str) and _PROGRAM_NAME.match(p) for p in programs):
            raise ValueError("scripts: malformed programs")
        digests = base64.b64decode(record["paths"], validate=True)
        if len(digests) % _DIGEST_BYTES:
            raise ValueError("scripts: malformed paths")
        return cls(scripts(record["activate"]), scripts(record["deactivate"]), tuple(programs), digests)


def _contains(digests: bytes, needle: bytes) -> bool:
    """Binary search in the sorted, fixed-width digests."""
    lo, hi = 0, len(digests) // _DIGEST_BYTES
    while lo < hi:
        mid = (lo + hi) // 2
        item = digests[mid * _DIGEST_BYTES:(mid + 1) * _DIGEST_BYTES]
        if item < needle:
            lo = mid + 1
        elif item > needle:
            hi = mid
        else:
            return True
    return False


def digests_of(paths: Iterable[str]) -> bytes:
    """Every path as a file and every directory above it as a directory."""
    found: set[bytes] = set()
    dirs: set[str] = set()
    for rel in paths:
        found.add(path_digest("f", rel))
        parent = posixpath.dirname(rel)
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = posixpath.dirname(parent)
    found.update(path_digest("d", d) for d in dirs)
    return b"".join(sorted(found))


def scripts_from_paths(entries: Iterable[tuple[str, str | None]],
                       contents: Mapping[str, bytes | None]) -> PackageScripts:
    """PackageScripts from (relative path, text placeholder) pairs and the scripts' bytes."""
    entries = list(entries)
    placeholders = dict(entries)
    found: dict[str, list[tuple[str, str, str]]] = {ACTIVATE_DIR: [], DEACTIVATE_DIR: []}
    for rel in sorted(contents):
        directory, name = posixpath.split(rel)
        data = contents[rel]
        if directory not in found or data is None or not _SCRIPT_NAME.match(name):
            continue
        if len(data) <= MAX_SCRIPT_BYTES and b"\0" not in data:
            found[directory].append((name, data.decode("utf-8", errors="replace"), placeholders.get(rel) or ""))
    programs = sorted({posixpath.basename(rel) for rel, _ in entries
                       if posixpath.dirname(rel) == "bin" and _PROGRAM_NAME.match(posixpath.basename(rel))})
    return PackageScripts(tuple(found[ACTIVATE_DIR]), tuple(found[DEACTIVATE_DIR]), tuple(programs),
                          digests_of(rel for rel, _ in entries))


def wanted_scripts(paths: Iterable[str]) -> list[str]:
    return [rel for rel in paths
            if posixpath.dirname(rel) in (ACTIVATE_DIR, DEACTIVATE_DIR) and _SCRIPT_NAME.match(posixpath.basename(rel))]


async def read_package_scripts(archive: Path) -> PackageScripts:
    """A verified archive's PackageScripts (the paths as its info/paths.json declares them;
    the layer holds exactly those, members.py checked it). noarch: python packages' paths
    are the archive's (`site-packages/...`), which no activation script tests."""
    pkg = await package_streaming.PackageArchive.from_path(archive)
    entries: list[tuple[str, str | None]] = []
    try:
        paths = await pkg.paths_json()
    except OSError:  # an old package: info/files and info/has_prefix, as conda reads them
        entries = await _old_package_paths(pkg)
    else:
        for entry in paths.paths:
            placeholder = entry.prefix_placeholder
            text_placeholder = None
            if placeholder is not None and placeholder.file_mode.text:
                text_placeholder = placeholder.placeholder
            entries.append((str(entry.relative_path), text_placeholder))
    wanted = wanted_scripts(rel for rel, _ in entries)
    contents = await pkg.read_files(wanted) if wanted else {}
    return scripts_from_paths(entries, contents)


# conda's placeholder of packages that name none in info/has_prefix (`path` alone).
_LEGACY_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"


async def _old_package_paths(pkg: package_streaming.PackageArchive) -> list[tuple[str, str | None]]:
    """(path, text placeholder) of a package without paths.json: info/files, and
    info/has_prefix lines `placeholder mode path` (text unless `binary`) or `path` alone."""
    info = await pkg.read_files(["info/files", "info/has_prefix"])
    files = info.get("info/files")
    if files is None:
        raise OSError("the package has neither info/paths.json nor info/files")
    placeholders: dict[str, str | None] = {}
    for line in (info.get("info/has_prefix") or b"").decode("utf-8", "strict").splitlines():
        parts = shlex.split(line) if line.strip() else []
        if len(parts) == 3:
            placeholders[parts[2]] = parts[0] if parts[1] != "binary" else None
        elif len(parts) == 1:
            placeholders[parts[0]] = _LEGACY_PLACEHOLDER
    return [(path, placeholders.get(path)) for path in files.decode("utf-8", "strict").splitlines() if path]
