"""Reproducible image layers: deterministic tar, deterministic compression, both hashed while streaming.

The same tree gives the same bytes on any machine and any day: directories first, then
every other entry, each part sorted by archive path (layer_order), one fixed mtime (1980-01-01: zip and other tools refuse earlier dates), owner root
(but for a user's home in the environment layer: OwnedDir) with empty names, modes normalised to 0755/0644 (exec bit kept), symlinks kept, files
that are hardlinks of each other written once plus tar hardlinks to the first name (so a
2 MiB file with 20 links stays 2 MiB), PAX format, then compression.py's host-independent
compressor (gzip members with no time and no file name, or zstd). The directories end
on a member (frame) boundary and so do the other entries: a group layer is its
layers' directories written once, then their other members copied (concat.py). Nothing is held in
memory beyond a piece of one file (1 MiB) and the compressor's few chunks in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Iterator, Sequence

from condery.layers import LayerBlob, PackageError
from condery.layers.compression import GZIP, check_compression, compressing_writer, open_decompressed
from condery.layers.tarstream import TarReader, UnusualTar

_DIR_MODE = 0o755
_FILE_MODE = 0o644
_EXEC_MODE = 0o755
_LINK_MODE = 0o777
# 1980-01-01T00:00:00Z: the earliest time every consumer accepts (zipfile refuses older).
LAYER_MTIME = 315532800


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        self._sink.flush()

    def tell(self) -> int:
        return self.size


@dataclass(frozen=True)
class _Entry:
    """One tar member before it is written: what a layer may contain and nothing more."""

    name: str  # archive path, no leading "/", no trailing "/"
    kind: str  # "dir" | "file" | "symlink" | "hardlink" (linkname: an earlier file entry)
    mode: int = _DIR_MODE
    size: int = 0
    linkname: str = ""
    source: Path | None = None  # file content, for kind == "file"
    uid: int = 0  # not root only for OwnedDir and under a TreeOwner's tree
    gid: int = 0


@dataclass(frozen=True)
class OwnedDir:
    """A directory written with an owner other than root (mode 0755), without parents."""

    name: str  # archive path, e.g. "home/jovyan"
    uid: int
    gid: int


@dataclass(frozen=True)
class TreeOwner:
    """The owner of every entry at or below `tree` (an archive path, e.g. "opt/conda"):
    the layers of an environment its user may change (a meta-package's `changeable`).
    Entries outside the tree (the prefix's parents, /etc) stay root's."""

    tree: str
    uid: int
    gid: int

    def owns(self, name: str) -> bool:
        return name == self.tree or name.startswith(self.tree + "/")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_control_character(text: str) -> bool:
    # A regular expression: checked for every entry of every layer (a generator over the
    # characters cost ~0.4 ms a small package).
    return _CONTROL.search(text) is not None


def check_member_name(name: str) -> None:
    """Refuse archive paths that could do harm when a client unpacks the layer.

    Outside the image root: absolute paths, `..`, empty parts. Another layer's files:
    an OCI whiteout (`.wh.NAME` deletes NAME from the layers below, `.wh..wh..opq` a
    whole directory). Confused tools and logs: newlines and other control characters.
    """
    if not name or name.startswith("/") or _has_control_character(name):
        raise PackageError(f"unsafe path in layer: {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise PackageError(f"unsafe path in layer: {name!r}")
    if parts[-1].startswith(".wh."):
        raise PackageError(f"whiteout name in layer: {name!r}")


def check_symlink(name: str, target: str) -> None:
    """Refuse a symlink whose target climbs above the image root.

    Relative targets such as `../lib/libz.so` are the norm in conda packages; absolute
    targets name a path of the container's own filesystem, which runtimes resolve
    inside the rootfs, so they are kept too.
    """
    if not target or _has_control_character(target):
        raise PackageError(f"symlink {name!r} has an empty or invalid target")
    if target.startswith("/"):
        return
    depth = name.count("/")  # directories between the root and the link
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise PackageError(f"symlink {name!r} points outside the image root: {target!r}")
        elif part not in ("", "."):
            depth += 1


def _normal_mode(st_mode: int) -> int:
    return _EXEC_MODE if st_mode & 0o111 else _FILE_MODE


def layer_order(entry: _Entry) -> tuple[bool, str]:
    """The order of a layer's entries: its directories, then everything else, each by name.

    Directories first, in a member of their own, so that a group layer can hold each
    directory once and copy its layers' other members as they are (concat.py):
    containers/storage refuses a layer holding one path twice. A parent still comes
    before its children (a prefix sorts first)."""
    return (entry.kind != "dir", entry.name)


def _parents(name: str) -> Iterator[str]:
    parts = name.split("/")
    for i in range(1, len(parts)):
        yield "/".join(parts[:i])


def _scan(root: Path, arcname_prefix: str, extra_dirs: Sequence[str],
          owned_dirs: Sequence[OwnedDir] = ()) -> list[_Entry]:
    """Every entry under root, placed at arcname_prefix, with parent directories, sorted."""
    prefix = arcname_prefix.strip("/")
    entries: dict[str, _Entry] = {}
    for owned in owned_dirs:
        # No parent entries: a layer's directory entry replaces the owner and mode the base
        # gave that directory (/home, /tmp), and runtimes create a missing parent 0755 root.
        check_member_name(owned.name)
        entries[owned.name] = _Entry(owned.name, "dir", uid=owned.uid, gid=owned.gid)
    inodes: dict[str, tuple[int, int]] = {}  # files with more than one link

    def add_dir(name: str) -> None:
        known = entries.get(name)
        if known is not None and known.kind == "dir" and not (known.uid or known.gid):
            return  # and so are its parents: every directory but the owned ones came through here
        for parent in (*_parents(name), name):
            check_member_name(parent)
            existing = entries.get(parent)
            if existing is not None and (existing.kind != "dir" or existing.uid or existing.gid):
                raise PackageError(f"{parent!r} is both a directory and a {existing.kind}")
            entries.setdefault(parent, _Entry(parent, "dir"))

    if prefix:
        add_dir(prefix)
    for extra in extra_dirs:
        add_dir(extra.strip("/"))
    # os.walk does not follow symlinked directories: a link is one entry, never a way out.
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for item in (*dirnames, *filenames):
            rel = item if rel_dir == "." else f"{rel_dir}/{item}"
            rel = rel.replace(os.sep, "/")
            name = f"{prefix}/{rel}" if prefix else rel
            check_member_name(name)
            path = Path(dirpath, item)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                check_symlink(name, target)
                entries[name] = _Entry(name, "symlink", _LINK_MODE, linkname=target)
            elif stat.S_ISDIR(st.st_mode):
                add_dir(name)
            elif stat.S_ISREG(st.st_mode):
                entries[name] = _Entry(name, "file", _normal_mode(st.st_mode), st.st_size, source=path)
                if st.st_nlink > 1:
                    inodes[name] = (st.st_dev, st.st_ino)
            else:
                raise PackageError(f"{name!r} is not a file, directory or symlink")
    ordered = sorted(entries.values(), key=layer_order)
    # Files sharing an inode: the first in archive order carries the bytes, the rest link to it.
    first_of: dict[tuple[int, int], str] = {}
    for i, entry in enumerate(ordered):
        inode = inodes.get(entry.name)
        if inode is None:
            continue
        if inode in first_of:
            ordered[i] = _Entry(entry.name, "hardlink", entry.mode, linkname=first_of[inode])
        else:
            first_of[inode] = entry.name
    return ordered


def _open_regular(path: Path, size: int) -> BinaryIO:
    """Open a file scanned as regular, refusing it if it has since become anything else.

    O_NOFOLLOW: a symlink swapped in after the scan is never read through, so a layer
    holds the package's own bytes and nothing of the host.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PackageError(f"{path.name!r} became a symlink while the layer was written") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        os.close(fd)
        raise PackageError(f"{path.name!r} changed while the layer was written")
    return os.fdopen(fd, "rb")


def tar_info(entry: _Entry) -> tarfile.TarInfo:
    """The tar header of an entry: the fixed mtime, no owner names, the normal modes."""
    info = tarfile.TarInfo(entry.name)
    info.mtime = LAYER_MTIME
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mode = entry.mode
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.linkname
    elif entry.kind == "hardlink":
        info.type = tarfile.LNKTYPE
        info.linkname = entry.linkname
    else:
        info.type = tarfile.REGTYPE
        info.size = entry.size
    return info


_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_COPY = 1 << 20
_TYPES = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "file": tarfile.REGTYPE}


def _octal(value: int, digits: int) -> bytes:
    return b"%0*o\0" % (digits - 1, value)


def tar_header(entry: _Entry) -> bytes:
    """The header block(s) tarfile writes for `entry` in PAX format (TarInfo.tobuf), built
    directly for the common case (an ASCII name and link name that fit ustar's fields, ids
    and sizes that fit its octal fields): tarfile's own TarInfo costs ~40 us an entry,
    which a layer of 20,000 small files pays 20,000 times. Anything else is tarfile's.
    tests/test_tarball.py compares both on every kind of entry."""
    name = entry.name + "/" if entry.kind == "dir" else entry.name
    if (len(name) <= 100 and len(entry.linkname) <= 100 and name.isascii() and entry.linkname.isascii()
            and entry.uid < 0o7777777 and entry.gid < 0o7777777 and entry.size < 0o77777777777):
        size = entry.size if entry.kind == "file" else 0
        head = b"".join((
            name.encode().ljust(100, b"\0"), _octal(entry.mode & 0o7777, 8), _octal(entry.uid, 8),
            _octal(entry.gid, 8), _octal(size, 12), _octal(LAYER_MTIME, 12), b"        ",
            _TYPES[entry.kind], entry.linkname.encode().ljust(100, b"\0"), tarfile.POSIX_MAGIC,
            bytes(64 + 16 + 155),  # no owner names, no device numbers (not a device), no prefix
        )).ljust(_BLOCK, b"\0")
        checksum = b"%06o\0" % sum(head)
        return head[:148] + checksum + head[155:]
    return tar_info(entry).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


class _LayerWriter:
    """tar -> sha256 (diff_id) -> compress -> sha256 (digest) -> file, in one stream.

    The tar is written here (tar_header, the bytes, padding, tarfile's end blocks): the
    same bytes as tarfile's PAX writer, without a TarInfo and a members list per entry.
    Every entry reaches the compressor as it is added, so close() can end a gzip member /
    zstd frame exactly where the entries end and the end blocks begin."""

    def __init__(self, out_path: Path, compression: str = GZIP, owner: TreeOwner | None = None) -> None:
        check_compression(compression)  # before the file exists
        self._out_path = out_path
        self._owner = owner
        self._raw = open(out_path, "wb")
        self._gz_hash = _HashingWriter(self._raw)
        self._compressor = compressing_writer(compression, self._gz_hash)  # type: ignore[arg-type]
        self._tar_hash = _HashingWriter(self._compressor)  # type: ignore[arg-type]
        self._offset = 0
        self._past_dirs = False

    def _write(self, data: bytes) -> None:
        self._tar_hash.write(data)
        self._offset += len(data)

    def add(self, entry: _Entry, content: BinaryIO | None = None) -> None:
        """Add the next entry; entries come in layer_order (directories first)."""
        if entry.kind == "dir":
            if self._past_dirs:
                raise ValueError(f"directory {entry.name!r} after the other entries (see layer_order)")
        elif not self._past_dirs:
            # The directories end a member (frame): concat.py writes a group's once.
            self._compressor.end_part()
            self._past_dirs = True
        if self._owner is not None and not (entry.uid or entry.gid) and self._owner.owns(entry.name):
            entry = dataclasses.replace(entry, uid=self._owner.uid, gid=self._owner.gid)
        header = tar_header(entry)
        if entry.kind != "file":
            self._write(header)
        elif content is None:
            assert entry.source is not None
            with _open_regular(entry.source, entry.size) as f:
                self._file(header, entry, f)
        else:
            self._file(header, entry, content)

    def _file(self, header: bytes, entry: _Entry, content: BinaryIO) -> None:
        left = entry.size
        if left <= _COPY:  # one write for a small file and its header
            data = content.read(left)
            if len(data) != left:
                raise OSError(f"unexpected end of data in {entry.name!r}")
            self._write(header + data + bytes(-left % _BLOCK))
            return
        self._write(header)
        while left:
            data = content.read(min(left, _COPY))
            if not data:
                raise OSError(f"unexpected end of data in {entry.name!r}")
            self._write(data)
            left -= len(data)
        self._write(bytes(-entry.size % _BLOCK))

    def close(self) -> LayerBlob:
        # The end-of-archive blocks in a member (frame) of their own: a group layer is then
        # its packages' layers with that last member cut off, one after the other (concat.py).
        # As tarfile ends an archive: two zero blocks, then zeros to a whole record.
        self._compressor.end_part()
        end = 2 * _BLOCK
        self._write(bytes(end + (-(self._offset + end)) % _RECORD))
        self._compressor.close()
        self._raw.close()
        return LayerBlob(
            digest="sha256:" + self._gz_hash.sha256.hexdigest(),
            diff_id="sha256:" + self._tar_hash.sha256.hexdigest(),
            size=self._gz_hash.size,
            path=self._out_path,
        )

    def abort(self) -> None:
        # Close the stream stack in order, then drop the partial output.
        for close in (self._compressor.abort, self._raw.close):
            with contextlib.suppress(Exception):
                close()
        self._out_path.unlink(missing_ok=True)


def write_layer(root: Path, arcname_prefix: str, out_path: Path, *,
                extra_dirs: Sequence[str] = (), owned_dirs: Sequence[OwnedDir] = (),
                compression: str = GZIP, owner: TreeOwner | None = None) -> LayerBlob:
    """Write every entry under `root` as a layer rooted at `arcname_prefix` (e.g. "opt/conda").

    The prefix's parent directories are emitted too, and so are `extra_dirs` (archive
    paths of directories to create even when `root` has nothing there), and so are
    `owned_dirs` (owned by their uid:gid, their parents left to the layers below), and
    with `owner` every entry of its tree is that uid:gid's. Raises
    PackageError for unsafe entries (special files, symlinks above the image root).
    `compression` is compression.GZIP or compression.ZSTD.
    """
    if not Path(root).is_dir():
        raise FileNotFoundError(f"layer root {root} is not a directory")
    entries = _scan(Path(root), arcname_prefix, extra_dirs, owned_dirs)
    writer = _LayerWriter(Path(out_path), compression, owner)
    try:
        for entry in entries:
            writer.add(entry)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _member_entry(member: tarfile.TarInfo) -> _Entry:
    """Validate a member read back from a layer and describe it as an _Entry (its owner
    kept: the layers of a changeable environment are their user's)."""
    kind = ("dir" if member.isdir() else "symlink" if member.issym() else "file" if member.isreg()
            else "hardlink" if member.islnk() else "")
    return _checked_entry(member.name, kind, member.mode, member.size, member.linkname, member.uid, member.gid)


def _checked_entry(name: str, kind: str, mode: int, size: int, linkname: str, uid: int, gid: int) -> _Entry:
    name = name.rstrip("/")
    check_member_name(name)
    owner = {"uid": uid, "gid": gid}
    if kind == "dir":
        return _Entry(name, "dir", **owner)
    if kind == "symlink":
        check_symlink(name, linkname)
        return _Entry(name, "symlink", _LINK_MODE, linkname=linkname, **owner)
    if kind == "file":
        return _Entry(name, "file", _normal_mode(mode), size, **owner)
    if kind == "hardlink":
        check_member_name(linkname)
        return _Entry(name, "hardlink", _normal_mode(mode), linkname=linkname, **owner)
    raise PackageError(f"{name!r} in a layer is not a file, directory, symlink or hardlink")


@contextlib.contextmanager
def _layer_stream(source: Path | BinaryIO) -> Iterator[IO[bytes]]:
    """The tar stream of a layer written by _LayerWriter (gzip members or zstd), from its
    path or a seekable file object (read from its start)."""
    with contextlib.ExitStack() as stack:
        if isinstance(source, Path):
            handle: BinaryIO = stack.enter_context(open(source, "rb"))
        else:
            handle = source
            handle.seek(0)
        with open_decompressed(handle) as stream:
            yield stream


def _layer_entries(source: Path | BinaryIO, lean: bool) -> Iterator[tuple[_Entry, Any]]:
    """Each entry of a layer, checked (_checked_entry), with a reader of a file's content.
    `lean`: read by tarstream.py (headers parsed directly: UnusualTar where it declines),
    else by tarfile."""
    with _layer_stream(source) as stream:
        if lean:
            reader = TarReader(stream)
            for item in reader.entries():
                entry = _checked_entry(item.name, item.kind, item.mode, item.size, item.linkname, item.uid, item.gid)
                yield entry, reader.content() if entry.kind == "file" else None
            return
        with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
            for member in tar:
                entry = _member_entry(member)
                yield entry, tar.extractfile(member) if entry.kind == "file" else None


def concat_layers(layers: Sequence[Path | BinaryIO], out_path: Path, compression: str = GZIP) -> LayerBlob:
    """One layer with the entries of several layers, as if they were applied in order.

    Directories are written once (first occurrence), all of them first (layer_order); for
    any other path the last layer that has it wins, as it would when the layers are
    stacked, and those follow in layer order. A path that is a directory in one layer and
    a file or symlink in another is refused. Two streamed passes: the first finds which
    occurrence of each path to keep, the second copies. A group without a path in two
    layers gets the same tar (diff_id) as concat.concat_compressed gives it.
    """
    # Our own layers are read with the lean tar reader (tarstream.py: tarfile read every
    # file's bytes to pass over them); one it declines is read with tarfile, from the start.
    try:
        return _concat_layers(layers, out_path, compression, lean=True)
    except UnusualTar:
        return _concat_layers(layers, out_path, compression, lean=False)


def _concat_layers(layers: Sequence[Path | BinaryIO], out_path: Path, compression: str, lean: bool) -> LayerBlob:
    kinds: dict[str, str] = {}
    dirs: dict[str, _Entry] = {}
    keep: dict[str, tuple[int, int]] = {}  # path -> (layer index, member index) to write
    for li, layer in enumerate(layers):
        for mi, (entry, _) in enumerate(_layer_entries(layer, lean)):
            seen = kinds.get(entry.name)
            if seen is not None and (seen == "dir") != (entry.kind == "dir"):
                raise PackageError(f"{entry.name!r} is a {seen} in one layer and a {entry.kind} in another")
            kinds[entry.name] = entry.kind
            if entry.kind == "dir":
                dirs.setdefault(entry.name, entry)
            else:
                keep[entry.name] = (li, mi)
    wanted = set(keep.values())
    writer = _LayerWriter(Path(out_path), compression)
    try:
        for name in sorted(dirs):
            writer.add(dirs[name])
        for li, layer in enumerate(layers):
            for mi, (entry, content) in enumerate(_layer_entries(layer, lean)):
                if (li, mi) not in wanted:
                    continue
                if entry.kind == "hardlink" and keep.get(entry.linkname, (-1, mi))[0] != li:
                    # Its target was replaced by a later layer: stacking would keep the
                    # old bytes under this name, which one merged layer cannot express.
                    raise PackageError(f"the hardlink {entry.name!r} points at a file another layer replaces")
                writer.add(entry, content)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
