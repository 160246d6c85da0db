"""A package's layer written straight from its archive: no install, no staging tree.

For almost every package, installing it is renaming (the prefix in front of each path)
and prefix placeholder replacement. This module does exactly what rattler's installer
does for such a package (crates/rattler/src/install/link.rs: text mode with its shebang
rules, binary mode with same-length NUL-padded C strings; the conda-meta record as
rattler's PrefixRecord serializes it) but reads the archive once, through the member
check's own reader (members.iter_archive: the same bounds, from the headers, before
any content), keeps the bytes in one spool (memory, then a temporary file past
SPOOL_MEMORY), and writes the layer's tar entries from there in the order, with the
modes and the record the installed tree gives (tarball.py). tests/test_stream_layer.py
shows both paths give byte-identical layers on every real fixture package.

What it does not do, it declines (NotStreamable) and package_layer.py installs the
package with rattler as before, which also gives the verdict on a package this module
finds wrong: this module never refuses a package itself, so the errors a client sees do
not depend on which path ran. Declined: `noarch: python` (relocation, entry points),
package scripts, packages without `info/paths.json`, `directory` entries, tar hardlinks,
softlinks that leave the prefix or are `no_link`, files the installer would fail on or
treat specially (a binary placeholder longer than the prefix, a shebang rattler cannot
read), and anything the member check refuses.

Python bytecode: the modules a package ships without a pyc are compiled as before
(bytecode.compile_bytecode), from a scratch tree holding only those sources.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import rattler

from condery.layers import LayerBlob, PackageError
from condery.layers.bytecode import BytecodePlan, CompiledFile, record_compiled
from condery.layers.compression import GZIP
from condery.layers.conda_meta import record_bytes
from condery.layers.members import (
    Content,
    Member,
    PackageLimits,
    UnusualArchive,
    check_members,
    iter_archive,
    parse_paths_json,
)
from condery.layers.tarball import (
    _EXEC_MODE,
    _FILE_MODE,
    _LINK_MODE,
    TreeOwner,
    _Entry,
    _LayerWriter,
    _parents,
    check_member_name,
    check_symlink,
    layer_order,
)

# Package bytes kept in memory before the spool moves to a temporary file.
SPOOL_MEMORY = 8 << 20  # small: a build's memory must not grow with package size (tests/test_memory.py)
_COPY_CHUNK = 1 << 20
# Linux's limit (rattler's is_valid_shebang_length).
_MAX_SHEBANG = 127
_SHEBANG = re.compile(r"^(#!(?:[ ]*)(/(?:\\ |[^ \n\r\t])*)(.*))$")
_PYTHON_EXE = re.compile(r"^python(?:\d+(?:\.\d+)?)?$")
# What package_layer removes from an installed tree before it is written.
_STAGING_ONLY = ("CACHEDIR.TAG", "conda-meta/history")
_INFO_FILES = ("info/index.json", "info/paths.json", "info/link.json")


class NotStreamable(Exception):
    """This package needs rattler's install (or its verdict); the message says why.

    `unforeseen`: not a rule of this module but an error it did not expect (a bug of
    ours, not a verdict on the package), which the caller logs as a warning. Both travel
    in `args`, so the exception crosses a process boundary whole (layers/workers.py)."""

    def __init__(self, reason: str, unforeseen: bool = False) -> None:
        super().__init__(reason, unforeseen)

    @property
    def unforeseen(self) -> bool:
        return bool(self.args[1])

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class PackageIdentity:
    """What a streamed layer needs of a repodata record, as plain data: rattler's records
    cannot be pickled, and the layer may be written in a worker process."""

    name: str  # normalized
    version: str
    build: str
    url: str
    channel: str
    file_name: str
    record_json: str  # RepoDataRecord.to_json(): the conda-meta record starts from it

    @classmethod
    def of(cls, record: rattler.RepoDataRecord) -> "PackageIdentity":
        return cls(record.name.normalized, str(record.version), str(record.build), record.url,
                   record.channel, record.file_name, record.to_json())

    @property
    def dist(self) -> str:
        return f"{self.name}-{self.version}-{self.build}"


@dataclass
class _Spooled:
    offset: int
    size: int
    mode: int


@dataclass
class _Read:
    """What one pass over the archive gave: members, metadata, and the package's bytes."""

    members: list[Member] = field(default_factory=list)
    info: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, _Spooled] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)


class _Spool:
    """One append-only store of file contents: memory first, a temporary file past a size.

    Every read and write names its offset (pread and pwrite on the file, slices of the
    memory), so nothing seeks: a package's thousands of small files cost a system call
    each, where seeking a buffered file flushed or dropped its buffer every time (py-spy:
    a quarter of a large package's layer was SpooledTemporaryFile.seek and read)."""

    def __init__(self, work_dir: Path, memory: int = SPOOL_MEMORY) -> None:
        self._dir, self._memory = work_dir, memory
        self._buffer = bytearray()
        self._file: BinaryIO | None = None  # unnamed, unbuffered: gone with the process
        self._end = 0

    def _put(self, data: bytes) -> None:
        if self._file is None and self._end + len(data) > self._memory:
            self._file = tempfile.TemporaryFile(dir=self._dir, buffering=0)
            _pwrite_all(self._file.fileno(), self._buffer, 0)
            self._buffer = bytearray()
        if self._file is None:
            self._buffer += data
        else:
            _pwrite_all(self._file.fileno(), data, self._end)
        self._end += len(data)

    def append(self, source: Content, size: int) -> int:
        offset = self._end
        left = size
        while left:
            chunk = source.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise NotStreamable("the archive ends inside a file")
            self._put(chunk)
            left -= len(chunk)
        return offset

    def append_bytes(self, data: bytes) -> int:
        offset = self._end
        self._put(data)
        return offset

    def read(self, offset: int, size: int) -> bytes:
        if self._file is None:
            with memoryview(self._buffer) as view:
                return bytes(view[offset:offset + size])
        parts = []
        while size > 0:
            part = os.pread(self._file.fileno(), size, offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
            size -= len(part)
        return b"".join(parts)

    def reader(self, offset: int, size: int) -> BinaryIO:
        return _SpoolReader(self, offset, size)  # type: ignore[return-value]

    def close(self) -> None:
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    done = os.pwrite(fd, data, offset)
    while done < len(data):  # a short write (a full disk raises instead)
        done += os.pwrite(fd, memoryview(data)[done:], offset + done)


class _SpoolReader:
    """A file object over one stretch of the spool (what the layer writer reads from)."""

    def __init__(self, spool: _Spool, offset: int, size: int) -> None:
        self._spool, self._pos, self._left = spool, offset, size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        data = self._spool.read(self._pos, n)
        self._pos += len(data)
        self._left -= len(data)
        return data


def read_archive(archive: Path, limits: PackageLimits, spool: _Spool) -> _Read:
    """Every member of the archive (members.iter_archive: the member check's bounds and
    refusals), the info files the layer needs, and every other file's bytes in `spool`.
    Read by the lean tar reader, or by tarfile where that one declines (UnusualArchive)."""
    try:
        try:
            return _read_members(iter_archive(archive, limits, lean=True), spool)
        except UnusualArchive:
            return _read_members(iter_archive(archive, limits), spool)
    except PackageError as exc:
        raise NotStreamable(f"refused by the member check: {exc}") from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise NotStreamable(f"unreadable archive ({type(exc).__name__})") from None


def _read_members(members: Iterator[tuple[Member, Content | None, int]], spool: _Spool) -> _Read:
    read = _Read()
    for member, content, mode in members:
        read.members.append(member)
        if member.kind == "file":
            assert content is not None
            if member.name.startswith("info/"):
                if member.name in _INFO_FILES:
                    read.info[member.name] = content.read(member.size)
            elif member.name not in read.files:  # a second copy is refused by the check
                read.files[member.name] = _Spooled(spool.append(content, member.size), member.size, mode)
        elif member.kind == "symlink":
            read.links.setdefault(member.name, member.linkname)
        elif member.kind == "hardlink" and not member.name.startswith("info/"):
            raise NotStreamable("tar hardlinks")
    return read


# --- prefix replacement, as rattler's link.rs ------------------------------------------


def _convert_shebang_to_env(shebang: str) -> str:
    match = _SHEBANG.match(shebang)
    if match is None:
        return shebang
    path, rest = match.group(2), match.group(3)
    exe = path.rsplit("/", 1)[-1]
    if _PYTHON_EXE.match(exe):
        return f"#!/bin/sh\n'''exec' \"{path}\"{rest} \"$0\" \"$@\" #'''"
    return f"#!/usr/bin/env {exe}{rest}"


def _replace_shebang(shebang: str, old: str, new: str) -> str:
    if " " in new:
        if old not in shebang:
            return shebang
        return _convert_shebang_to_env(shebang).replace(old, new)
    replaced = shebang.replace(old, new)
    if not replaced.startswith("#!"):
        return replaced
    if len(replaced.encode()) <= _MAX_SHEBANG:
        return replaced
    return _convert_shebang_to_env(replaced)


def replace_text(data: bytes, old: str, new: str) -> bytes:
    """rattler's copy_and_replace_textual_placeholder on a unix platform."""
    head = b""
    if data.startswith(b"#!"):
        end = data.find(b"\n")
        if end < 0:
            raise NotStreamable("a text file with a shebang and no newline")  # rattler panics on it
        try:
            first = data[:end].decode("utf-8")
        except UnicodeDecodeError:
            raise NotStreamable("a shebang that is not UTF-8") from None
        head = _replace_shebang(first, old, new).encode()
        data = data[end:]
    return head + data.replace(old.encode(), new.encode())


def replace_binary(data: bytes, old: str, new: str) -> bytes:
    """rattler's copy_and_replace_cstring_placeholder: every C string holding the
    placeholder keeps its length, the rest padded with NULs."""
    old_b, new_b = old.encode(), new.encode()
    if len(new_b) > len(old_b):
        raise NotStreamable("the prefix is longer than a binary placeholder")
    out = []
    pos = 0
    while True:
        index = data.find(old_b, pos)
        if index < 0:
            out.append(data[pos:])
            return b"".join(out)
        out.append(data[pos:index])
        end = data.find(b"\0", index + len(old_b))
        if end < 0:
            end = len(data)
        segment = data[index:end].replace(old_b, new_b)
        out.append(segment)
        out.append(b"\0" * (end - index - len(segment)))
        pos = end


# --- the layer ---------------------------------------------------------------------------


@dataclass
class StreamPlan:
    """Everything a layer is written from: entries, where their bytes are, the record."""

    dist: str
    prefix: str  # archive path of the prefix, e.g. "opt/conda"
    record: dict[str, Any]
    paths: list[tuple[str, str, int]]  # (path, "file" | "symlink", mode) in the layer, below the prefix
    contents: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (spool offset, size)
    links: dict[str, str] = field(default_factory=dict)
    extra: dict[str, bytes] = field(default_factory=dict)  # pycs compiled for the layer
    sources: dict[str, tuple[int, int]] = field(default_factory=dict)  # modules to compile


def _check_index(record: PackageIdentity, index: dict[str, Any]) -> None:
    try:
        found = (rattler.PackageName(index["name"]).normalized, str(rattler.Version(str(index["version"]))),
                 str(index["build"]))
    except Exception:
        raise NotStreamable("an unreadable info/index.json") from None
    if found != (record.name, record.version, record.build):
        raise NotStreamable("the archive is not the package the repodata names")
    noarch = index.get("noarch")
    if noarch not in (None, "generic") or index.get("noarch_python"):
        raise NotStreamable(f"noarch: {noarch}")


def _pyc_jobs(paths: list[dict[str, Any]], symlinks: set[str], bytecode: BytecodePlan) -> list[str]:
    """The modules bytecode.compile_bytecode would compile for these paths (its _jobs on
    the installed tree), or NotStreamable where the tree could make that differ."""
    declared = {str(e["_path"]) for e in paths}
    jobs = []
    for entry in paths:
        src = str(entry["_path"])
        if not src.endswith(".py") or not src.startswith(bytecode.lib_dir + "/"):
            continue
        directory, name = src.rsplit("/", 1)
        pyc = f"{directory}/__pycache__/{name[:-3]}.{bytecode.tag}.pyc"
        if pyc in declared:
            continue
        if any(parent in symlinks for parent in _parents(src)) or entry.get("path_type", "hardlink") != "hardlink":
            continue  # compile_bytecode skips what is not a regular file under real directories
        cache_dir = f"{directory}/__pycache__"
        if cache_dir in declared or any(d.startswith(pyc + "/") for d in declared):
            raise NotStreamable("a package file in the way of a pyc")
        jobs.append(src)
    return jobs


def plan_layer(record: PackageIdentity, read: _Read, spool: _Spool, *, prefix: str,
               bytecode: BytecodePlan | None) -> StreamPlan:
    """The layer rattler's install would give, from one reading of the archive (blocking).

    `plan.record` is the conda-meta record as rattler writes it (PrefixRecord: the
    repodata record, `files`, `paths_data`), before package_layer scrubs it."""
    dist = record.dist
    paths_json = read.info.get("info/paths.json")
    index_json = read.info.get("info/index.json")
    if paths_json is None or index_json is None:
        raise NotStreamable("no info/paths.json")
    try:
        index = json.loads(index_json)
        raw_paths = json.loads(paths_json)["paths"]
        if not isinstance(index, dict) or not isinstance(raw_paths, list):
            raise TypeError
        declared = parse_paths_json(paths_json)
        check_members(read.members, declared)
    except (ValueError, KeyError, TypeError, PackageError) as exc:
        raise NotStreamable(f"refused by the member check: {exc}") from None
    _check_index(record, index)
    if "info/link.json" in read.info:
        # package_layer._inspect reads entry points of any package: let it judge those.
        try:
            link = json.loads(read.info["info/link.json"])
            if (link.get("noarch") or {}).get("entry_points"):
                raise NotStreamable("entry points")
        except (ValueError, AttributeError):
            raise NotStreamable("an unreadable info/link.json") from None

    new_prefix = "/" + prefix.strip("/")
    entries: list[dict[str, Any]] = []
    plan = StreamPlan(dist, prefix.strip("/"), {}, [])
    for raw in raw_paths:
        if not isinstance(raw, dict):
            raise NotStreamable("a paths.json entry that is not an object")
        path = str(raw["_path"])
        path_type = raw.get("path_type", "hardlink")
        no_link = bool(raw.get("no_link", False))
        placeholder = raw.get("prefix_placeholder")
        file_mode = raw.get("file_mode")
        sha256 = raw.get("sha256")
        size = raw.get("size_in_bytes")
        if path.startswith("conda-meta/") or path in _STAGING_ONLY or path_type not in ("hardlink", "softlink"):
            raise NotStreamable(f"a {path_type} entry {path!r}")
        if (placeholder is None) != (file_mode is None) or file_mode not in (None, "text", "binary") \
                or (placeholder is not None and not isinstance(placeholder, str)):
            raise NotStreamable("an unusual prefix placeholder entry")
        if sha256 is not None and not (isinstance(sha256, str) and re.fullmatch(r"[0-9a-f]{64}", sha256)):
            raise NotStreamable("an unusual sha256")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise NotStreamable("an unusual size")
        out: dict[str, Any] = {"_path": path, "path_type": path_type}
        if no_link:
            out["no_link"] = True
        if sha256 is not None:
            out["sha256"] = sha256
        if path_type == "softlink":
            target = read.links[path]
            if no_link or target.startswith("/"):
                raise NotStreamable("a softlink rattler would copy or warn about")
            depth = path.count("/")
            for part in target.split("/"):
                depth += -1 if part == ".." else (0 if part in ("", ".") else 1)
                if depth < 0:
                    raise NotStreamable("a softlink out of the prefix")
            actual = hashlib.sha256(target.encode()).hexdigest()
            if actual != sha256:
                out["sha256_in_prefix"] = actual
            out["size_in_bytes"] = size if size is not None else len(target.encode())
            plan.links[path] = target
            plan.paths.append((path, "symlink", _LINK_MODE))
        else:
            spooled = read.files[path]
            if not spooled.mode & 0o400:
                raise NotStreamable("a file its owner cannot read")
            mode = _EXEC_MODE if spooled.mode & 0o111 else _FILE_MODE
            if placeholder is not None:
                data = spool.read(spooled.offset, spooled.size)
                data = (replace_text if file_mode == "text" else replace_binary)(data, placeholder, new_prefix)
                actual = hashlib.sha256(data).hexdigest()
                if actual != sha256:
                    out["sha256_in_prefix"] = actual
                out["size_in_bytes"] = len(data)
                out["file_mode"] = file_mode
                out["prefix_placeholder"] = placeholder
                plan.contents[path] = (spool.append_bytes(data), len(data))
            else:
                if sha256 is None:
                    digest = hashlib.sha256()
                    reader = spool.reader(spooled.offset, spooled.size)
                    while chunk := reader.read(_COPY_CHUNK):
                        digest.update(chunk)
                    out["sha256_in_prefix"] = digest.hexdigest()
                out["size_in_bytes"] = size if size is not None else spooled.size
                plan.contents[path] = (spooled.offset, spooled.size)
            plan.paths.append((path, "file", mode))
        entries.append(out)
    if bytecode is not None:
        symlinks = {m.name for m in read.members if m.kind == "symlink"}
        for src in _pyc_jobs(raw_paths, symlinks, bytecode):
            plan.sources[src] = plan.contents[src]

    # rattler's installer sorts what it linked by path (component by component: "a/b"
    # before "a-b"), whatever the order of paths.json.
    entries.sort(key=lambda e: e["_path"].split("/"))
    data = json.loads(record.record_json)
    data["files"] = [e["_path"] for e in entries]
    data["paths_data"] = {"paths": entries, "paths_version": 1}
    plan.record = data
    return plan


def write_scratch_sources(plan: StreamPlan, spool: _Spool, target: Path) -> None:
    """The modules to compile, at their paths below `target`, and the record
    bytecode.compile_bytecode reads the file list from."""
    (target / "conda-meta").mkdir(parents=True)
    (target / "conda-meta" / f"{plan.dist}.json").write_text(json.dumps({"files": sorted(plan.sources)}))
    for src, (offset, size) in plan.sources.items():
        path = target / src
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(spool.read(offset, size))


def add_compiled(plan: StreamPlan, compiled: list[CompiledFile], target: Path) -> None:
    """The pycs compile_bytecode left in `target`, into the layer and its record."""
    for item in compiled:
        plan.extra[item.path] = (target / item.path).read_bytes()
        plan.paths.append((item.path, "file", _FILE_MODE))
    record_compiled(plan.record, compiled)


def write_plan(plan: StreamPlan, spool: _Spool, out_path: Path, compression: str = GZIP,
               owner: TreeOwner | None = None) -> LayerBlob:
    """Write the layer: tarball.write_layer's entries and order for the installed tree
    (with `owner`, its tree owned by that uid:gid, as write_layer's)."""
    record = record_bytes(plan.record)
    entries: dict[str, _Entry] = {}

    def add_dir(name: str) -> None:
        known = entries.get(name)
        if known is not None and known.kind == "dir":
            return  # and so are its parents: every directory came through here
        for parent in (*_parents(name), name):
            check_member_name(parent)
            existing = entries.get(parent)
            if existing is not None and existing.kind != "dir":
                raise PackageError(f"{parent!r} is both a directory and a {existing.kind}")
            entries.setdefault(parent, _Entry(parent, "dir"))

    root = plan.prefix
    if root:
        add_dir(root)
    meta = f"conda-meta/{plan.dist}.json"
    items = list(plan.paths)
    items.append((meta, "file", _FILE_MODE))
    for rel, kind, mode in items:
        name = f"{root}/{rel}" if root else rel
        check_member_name(name)
        if "/" in rel:
            add_dir(name.rsplit("/", 1)[0])
        existing = entries.get(name)
        if existing is not None:
            raise PackageError(f"{name!r} is both a directory and a {kind}")
        if kind == "symlink":
            check_symlink(name, plan.links[rel])
            entries[name] = _Entry(name, "symlink", _LINK_MODE, linkname=plan.links[rel])
        else:
            size = len(record) if rel == meta else (
                len(plan.extra[rel]) if rel in plan.extra else plan.contents[rel][1])
            entries[name] = _Entry(name, "file", mode, size, source=Path(rel))
    writer = _LayerWriter(out_path, compression, owner)
    try:
        for entry in sorted(entries.values(), key=layer_order):
            if entry.kind != "file":
                writer.add(entry)
                continue
            rel = str(entry.source)
            if rel == meta:
                content: BinaryIO = io.BytesIO(record)
            elif rel in plan.extra:
                content = io.BytesIO(plan.extra[rel])
            else:
                content = spool.reader(*plan.contents[rel])
            writer.add(entry, content)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def open_spool(work_dir: Path) -> _Spool:
    return _Spool(Path(work_dir))


Spool = _Spool
ArchiveRead = _Read


__all__ = ["ArchiveRead", "NotStreamable", "PackageIdentity", "Spool", "StreamPlan", "add_compiled", "open_spool", "plan_layer", "read_archive",
           "replace_binary", "replace_text", "write_plan", "write_scratch_sources"]
