"""What a package archive really holds, checked against what it declares.

conda's `info/paths.json` (or `info/files` for old packages) is the list the installer
links, and the installer follows symlinks while it links and replaces placeholders. So
a package whose archive holds the symlink `share/etc -> /etc` while `paths.json` lists
`share/etc/shadow` as a regular file would have the host's `/etc/shadow` copied into its
layer; one whose `share/env -> /proc/self/environ` is declared a text file with a
placeholder would have the server's environment in it. The fix is at the root: before
anything is extracted or linked, the archive's real members are read here (streamed,
never written to disk) and must agree with the declaration:

- every declared path is a regular-file member (or, for `softlink` entries, a symlink
  member; `directory` entries a directory), with no symlink member above it;
- every file, symlink and hardlink member outside `info/` is declared;
- a hardlink member points at a regular-file member of the same archive;
- no path is declared or stored twice, no member is a device, fifo or the like;
- names are safe (no `..`, no absolute paths, no OCI whiteouts, no control characters);
- the unpacked size and the number of members stay under the configured bounds, checked
  from the tar headers before the bytes behind them are read.

Anything else refuses the package with a PackageError naming it.
"""

from __future__ import annotations

import bz2
import json
import shlex
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Mapping, Protocol

from condery.layers import PackageError
from condery.layers.tarball import check_member_name, check_symlink
from condery.layers.tarstream import TarReader, UnusualTar

# Extended headers (PAX, GNU long names) are read into memory whole by tarfile: a hostile
# header declaring gigabytes would be allocated. Real ones are a few hundred bytes.
_MAX_EXTENDED_HEADER = 1 << 20
# The declared path types conda-build writes; anything else is refused.
_PATH_TYPES = frozenset({"hardlink", "softlink", "directory"})
# Metadata the installer reads from the extracted tree: it must be the package's own bytes.
_METADATA = frozenset({"info/index.json", "info/paths.json", "info/files", "info/has_prefix",
                       "info/link.json", "info/no_link", "info/no_softlink"})


@dataclass(frozen=True)
class PackageLimits:
    """Bounds on what one package may unpack to (disk and inodes)."""

    max_unpacked_bytes: int = 8 << 30
    max_files: int = 250_000


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    size: int = 0
    linkname: str = ""


@dataclass(frozen=True)
class Declared:
    """One entry of info/paths.json (or info/files)."""

    path: str
    path_type: str  # "hardlink" (a regular file) | "softlink" | "directory"
    has_placeholder: bool = False


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tar):  # type: ignore[no-untyped-def] # tarfile's private hook
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) and self.size > _MAX_EXTENDED_HEADER:
            raise PackageError(f"an extended tar header of {self.size} bytes")
        return super()._proc_member(tar)


def _kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    raise PackageError(f"{info.name!r} is a device, fifo or other special file")


class Content(Protocol):
    """A member's bytes, read before the next member is asked for (up to `n` a call)."""

    def read(self, n: int) -> bytes: ...


class UnusualArchive(PackageError):
    """A tar feature the lean reader (tarstream.py) leaves to tarfile: the stream is not
    refused for it, only read again by the member check's own reader."""


def _counted(budget: list[int], limits: PackageLimits, size: int | None) -> None:
    """Count one member (and a file's bytes) against the package's bounds."""
    budget[1] -= 1
    if budget[1] < 0:
        raise PackageError(f"holds more than {limits.max_files} files")
    if size is not None:
        budget[0] -= size
        if budget[0] < 0:
            raise PackageError(f"unpacks to more than {limits.max_unpacked_bytes} bytes")


def _tar_entries(stream: IO[bytes], mode: str, budget: list[int],
                 limits: PackageLimits) -> Iterator[tuple[Member, Content | None, int]]:
    """Members of one tar stream, read by tarfile: each with its content (files) and mode;
    budget = [bytes left, members left], shared across streams."""
    try:
        with tarfile.open(fileobj=stream, mode=mode, tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
            for info in tar:
                _counted(budget, limits, info.size if info.isreg() else None)
                name = info.name.rstrip("/") if info.isdir() else info.name
                member = Member(name, _kind(info), info.size if info.isreg() else 0, info.linkname)
                content = None
                if info.isreg():
                    # The stream stands at the file's bytes: read them from it (what extractfile
                    # does, without an object per file); tarfile skips the padding itself.
                    content = tar.fileobj if tar.fileobj.tell() == info.offset_data else tar.extractfile(info)
                yield member, content, info.mode
    except PackageError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeError) as exc:
        raise PackageError(f"its archive is not a readable tar stream ({type(exc).__name__})") from None


def _lean_entries(stream: IO[bytes], budget: list[int],
                  limits: PackageLimits) -> Iterator[tuple[Member, Content | None, int]]:
    """The same members as _tar_entries gives, through tarstream.TarReader (headers
    parsed directly, contents read once); UnusualArchive where that reader declines."""
    reader = TarReader(stream, max_extended=_MAX_EXTENDED_HEADER)
    try:
        for entry in reader.entries():
            _counted(budget, limits, entry.size if entry.kind == "file" else None)
            member = Member(entry.name, entry.kind, entry.size, entry.linkname)
            yield member, reader.content() if entry.kind == "file" else None, entry.mode
    except UnusualTar as exc:
        raise UnusualArchive(str(exc)) from None
    except (OSError, ValueError, EOFError) as exc:
        raise PackageError(f"its archive is not a readable tar stream ({type(exc).__name__})") from None


def iter_archive(archive: Path, limits: PackageLimits,
                 lean: bool = False) -> Iterator[tuple[Member, Content | None, int]]:
    """Every member of a `.tar.bz2` or `.conda` archive, in archive order (blocking), each
    with its content (a file's bytes, read before the next member is asked for) and its
    mode: the one reading of an archive, for the member check (read_members) and for
    layers written straight from the archive (stream_layer.py). A `.conda`'s info tarball
    comes before its pkg tarball. The bounds of `limits` are checked from the headers
    before any content is read.

    `lean`: read with tarstream.py rather than tarfile (a third of a large package's
    layer went into tarfile's stream reading); a feature it leaves to tarfile raises
    UnusualArchive, and the caller reads the archive with tarfile instead.
    """
    budget = [limits.max_unpacked_bytes, limits.max_files]
    if archive.name.endswith(".tar.bz2"):
        with open(archive, "rb") as raw:
            if lean:
                with bz2.BZ2File(raw) as unpacked:
                    yield from _lean_entries(unpacked, budget, limits)  # type: ignore[arg-type]
            else:
                yield from _tar_entries(raw, "r|bz2", budget, limits)
        return
    if not archive.name.endswith(".conda"):
        raise PackageError("is neither a .conda nor a .tar.bz2 archive")
    import zstandard  # a runtime dependency already (zstd base layers)

    try:
        with zipfile.ZipFile(archive) as zf:
            inner = [n for n in zf.namelist() if n.endswith(".tar.zst")]
            if sorted(n.split("-", 1)[0] for n in inner) != ["info", "pkg"]:
                raise PackageError("is a .conda archive without exactly one info and one pkg tarball")
            for name in sorted(inner):
                with zf.open(name) as compressed:
                    reader = zstandard.ZstdDecompressor().stream_reader(compressed)
                    if lean:
                        yield from _lean_entries(reader, budget, limits)
                    else:
                        yield from _tar_entries(reader, "r|", budget, limits)
    except (zipfile.BadZipFile, zstandard.ZstdError, OSError) as exc:
        raise PackageError(f"its archive is not a readable .conda file ({type(exc).__name__})") from None


def read_members(archive: Path, limits: PackageLimits) -> list[Member]:
    """Every member of a `.tar.bz2` or `.conda` archive, in archive order (blocking)."""
    return [member for member, _, _ in iter_archive(archive, limits)]


def parse_paths_json(data: bytes) -> list[Declared]:
    try:
        entries = json.loads(data)["paths"]
        declared = [
            Declared(e["_path"], e.get("path_type", "hardlink"), bool(e.get("prefix_placeholder")))
            for e in entries
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PackageError(f"unreadable info/paths.json ({type(exc).__name__})") from None
    for d in declared:
        if not isinstance(d.path, str) or not isinstance(d.path_type, str):
            raise PackageError(f"bad info/paths.json entry {d.path!r}")
    return declared


def parse_files(files: bytes, has_prefix: bytes | None, members: Mapping[str, Member]) -> list[Declared]:
    """The declaration of an old package without paths.json: info/files (+ info/has_prefix).

    As in conda, each listed path's type is what the archive holds, and has_prefix lines
    (`placeholder mode path`, or just `path`) mark the files with placeholders.
    """
    text = files.decode("utf-8", "strict") if files else ""
    placeholders: set[str] = set()
    for line in (has_prefix or b"").decode("utf-8", "strict").splitlines():
        if line.strip():
            try:
                placeholders.add(shlex.split(line)[-1])
            except ValueError:
                raise PackageError(f"unreadable info/has_prefix line {line[:80]!r}") from None
    declared = []
    for path in (p for p in text.splitlines() if p):
        member = members.get(path)
        kind = "softlink" if member is not None and member.kind == "symlink" else "hardlink"
        declared.append(Declared(path, kind, path in placeholders))
    unknown = placeholders - {d.path for d in declared}
    if unknown:
        raise PackageError(f"info/has_prefix names {sorted(unknown)[0]!r}, which info/files does not list")
    return declared


def _symlink_above(path: str, symlinks: set[str]) -> str | None:
    parts = path.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in symlinks:
            return parent
    return None


def check_members(members: list[Member], declared: list[Declared], source: str = "info/paths.json") -> None:
    """Refuse an archive whose members disagree with its declaration (see module doc)."""
    by_name: dict[str, Member] = {}
    for m in members:
        check_member_name(m.name)
        if m.name in by_name and not (m.kind == "dir" and by_name[m.name].kind == "dir"):
            raise PackageError(f"the archive holds {m.name!r} twice")
        if m.kind == "symlink":
            if m.name.startswith("info/") and m.linkname.startswith("/"):
                raise PackageError(f"the metadata symlink {m.name!r} points outside the package")
            check_symlink(m.name, m.linkname)
        elif m.kind == "hardlink":
            target = by_name.get(m.linkname)
            if target is None or target.kind != "file":
                raise PackageError(f"the hardlink {m.name!r} does not point at a regular file of the package")
        if m.name in _METADATA and m.kind != "file":
            raise PackageError(f"{m.name} is a {m.kind}, not a regular file")
        by_name[m.name] = m
    symlinks = {m.name for m in members if m.kind == "symlink"}
    for m in members:
        above = _symlink_above(m.name, symlinks)
        if above is not None:
            raise PackageError(f"{m.name!r} lies below the symlink {above!r}")

    seen: set[str] = set()
    for d in declared:
        check_member_name(d.path)
        if d.path in seen:
            raise PackageError(f"{source} lists {d.path!r} twice")
        seen.add(d.path)
        if d.path_type not in _PATH_TYPES:
            raise PackageError(f"{d.path!r} has the unknown path type {d.path_type!r}")
        above = _symlink_above(d.path, symlinks)
        if above is not None:
            raise PackageError(f"{d.path!r} lies below the symlink {above!r}")
        member = by_name.get(d.path)
        kind = None if member is None else member.kind
        if d.path_type == "softlink":
            if kind != "symlink":
                raise PackageError(f"{d.path!r} is declared a symlink but the archive holds a {kind or 'nothing'}")
            if d.has_placeholder:
                raise PackageError(f"the symlink {d.path!r} is declared to hold a prefix placeholder")
        elif d.path_type == "directory":
            if kind not in (None, "dir"):
                raise PackageError(f"{d.path!r} is declared a directory but the archive holds a {kind}")
        elif kind not in ("file", "hardlink"):
            raise PackageError(f"{d.path!r} is declared a file but the archive holds a {kind or 'nothing'}")

    for m in members:
        if m.kind != "dir" and not m.name.startswith("info/") and m.name not in seen:
            raise PackageError(f"the archive holds {m.name!r}, which its {source} does not list")


def verify_archive(archive: Path, paths_json: bytes | None, files: bytes | None, has_prefix: bytes | None,
                   limits: PackageLimits) -> None:
    """Read the archive's members and check them against its declaration (blocking)."""
    members = read_members(archive, limits)
    if paths_json is not None:
        declared = parse_paths_json(paths_json)
    elif files is not None:
        try:
            declared = parse_files(files, has_prefix, {m.name: m for m in members})
        except UnicodeDecodeError:
            raise PackageError("info/files or info/has_prefix is not UTF-8") from None
    else:
        raise PackageError("has neither info/paths.json nor info/files")
    check_members(members, declared, "info/paths.json" if paths_json is not None else "info/files")
