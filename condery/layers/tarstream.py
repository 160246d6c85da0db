"""A lean reader of tar streams: headers parsed here, file contents handed over or skipped.

tarfile in stream mode ("r|") reads a stream in 10 KB pieces through a buffer it copies,
and reads every file's bytes to pass over them: a third of the time of writing a large
package's layer went there, and most of a group layer's (concat.py). This reader takes
a header block, and then exactly the bytes it is asked for.

It reads what condery's layer writer and conda's packagers write (ustar headers, PAX
`path`/`linkpath`/`size` records, GNU long names and link names) and gives for them what
tarfile gives. Anything else raises UnusualTar, and the caller reads the stream with
tarfile instead (global or sparse headers, base-256 numbers, other PAX records that would
change an entry, contents behind a link or a directory, a stream that ends without its
end block). tarfile stays the judge of a package: the member check of rattler's install
path (members.verify_archive), which gives the verdict on whatever this reader declines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

BLOCK = 512
# PAX records that do not change what an entry is for condery (times and owner names,
# which layers set themselves); uid and gid are read (a changeable environment's owner).
_IGNORED_PAX = frozenset({"mtime", "atime", "ctime", "uname", "gname", "comment"})
_KINDS = {b"0": "file", b"\0": "file", b"5": "dir", b"2": "symlink", b"1": "hardlink"}
# Extended headers (PAX, GNU long name and link name) before one entry: a stream of them
# without end would be read for as long as it decompresses, counted against no bound.
_MAX_EXTENDED_IN_A_ROW = 8


class UnusualTar(Exception):
    """A tar feature this reader leaves to tarfile."""


class Stream(Protocol):
    """What is read from: up to `n` bytes a call (and, if it has one, `skip(n)`)."""

    def read(self, n: int) -> bytes: ...


@dataclass(frozen=True)
class TarEntry:
    name: str  # as tarfile gives it (a directory's without its trailing slash)
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    size: int  # a file's content bytes; 0 for anything else
    linkname: str
    mode: int
    uid: int = 0
    gid: int = 0


class TarReader:
    """Entries of one tar stream. A file's content is read through `read_content` before
    the next entry is asked for; what is not read is skipped. `offset` is where the
    reader stands in the stream; after the last entry, `end` is where the end-of-archive
    block starts. `max_extended` bounds PAX and GNU long-name headers (read whole)."""

    def __init__(self, stream: Stream, max_extended: int = 1 << 20) -> None:
        self._stream, self._max_extended = stream, max_extended
        self.offset = 0
        self.end: int | None = None
        self._left = 0  # content of the current entry not read yet
        self._padding = 0

    def _read(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            data = self._stream.read(left)
            if not data:
                raise UnusualTar("the stream ends inside an entry")
            parts.append(data)
            left -= len(data)
        self.offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def skip(self, n: int) -> None:
        skip = getattr(self._stream, "skip", None)  # a stream that passes bytes by without copying
        if skip is not None and n > 0:
            skip(n)
            self.offset += n
            return
        while n > 0:
            step = min(n, 1 << 20)
            self._read(step)
            n -= step

    def read_content(self, n: int = -1) -> bytes:
        """Up to `n` more bytes of the current file's content (all of it: -1)."""
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._read(n) if n else b""

    def content(self) -> "_Content":
        """The current file's content as a file object (what a writer reads from)."""
        return _Content(self)

    def _extended(self, size: int) -> bytes:
        if size > self._max_extended:
            raise UnusualTar(f"an extended header of {size} bytes")
        data = self._read(size)
        self.skip(-size % BLOCK)
        return data

    def entries(self) -> Iterator[TarEntry]:
        pax: dict[str, str] = {}
        long_name = long_link = None
        extended = 0
        while True:
            self.skip(self._left + self._padding)
            self._left = self._padding = 0
            block = self._read(BLOCK)
            if block.count(0) == BLOCK:
                self.end = self.offset - BLOCK
                return
            stored = _number(block[148:156])
            unsigned = 256 + sum(block) - sum(block[148:156])
            if stored != unsigned and stored != unsigned - 256 * _high_bytes(block):
                raise UnusualTar("a tar header with a bad checksum")
            kind = block[156:157]
            size = _number(block[124:136])
            if kind in (b"x", b"L", b"K"):
                extended += 1
                if extended > _MAX_EXTENDED_IN_A_ROW:
                    raise UnusualTar(f"more than {_MAX_EXTENDED_IN_A_ROW} extended headers before an entry")
            else:
                extended = 0
            if kind == b"x":
                pax = _pax_records(self._extended(size))
                continue
            if kind in (b"L", b"K"):
                text = _field(self._extended(size))
                if kind == b"L":
                    long_name = text
                else:
                    long_link = text
                continue
            if kind not in _KINDS:
                raise UnusualTar(f"a tar entry of type {kind!r}")
            name = _field(block[0:100])
            what = _KINDS[kind]
            if kind == b"\0" and name.endswith("/"):
                what = "dir"  # tarfile: the old V7 way of writing a directory
            if what == "dir":
                name = name.rstrip("/")
            prefix = _field(block[345:500])
            if prefix:
                name = f"{prefix}/{name}"
            linkname = _field(block[157:257])
            if long_name is not None:
                name = long_name.rstrip("/") if what == "dir" else long_name
            if long_link is not None:
                linkname = long_link
            if "path" in pax and long_name is not None:
                raise UnusualTar("a GNU long name and a PAX path for one entry")
            if pax:
                name = pax["path"].rstrip("/") if "path" in pax else name
                linkname = pax.get("linkpath", linkname)
                if "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        raise UnusualTar("an unreadable PAX size") from None
            uid, gid = _number(block[108:116]), _number(block[116:124])
            try:
                uid, gid = int(pax.get("uid", uid)), int(pax.get("gid", gid))
            except ValueError:
                raise UnusualTar("an unreadable PAX uid or gid") from None
            pax, long_name, long_link = {}, None, None
            if what != "file" and size:
                raise UnusualTar(f"content behind a {what}")
            mode = _number(block[100:108])
            self._left, self._padding = size, -size % BLOCK
            yield TarEntry(name, what, size if what == "file" else 0, linkname, mode, uid, gid)


class _Content:
    """A file object over the current entry's content."""

    def __init__(self, reader: TarReader) -> None:
        self.read = reader.read_content


def _high_bytes(block: bytes) -> int:
    """How many bytes of the header, its checksum field left out, are 0x80 or more (the
    difference of a signed checksum, which some old tars write)."""
    outside = block[:148] + block[156:]
    return len(outside) - len(outside.translate(None, bytes(range(128, 256))))


def _field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(raw: bytes) -> int:
    if raw[:1] in (b"\x80", b"\xff"):
        raise UnusualTar("a base-256 number in a tar header")
    try:
        return int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise UnusualTar("an unreadable number in a tar header") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """A PAX extended header's records (`<length> <key>=<value>\\n`)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:].strip(b"\0"):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
            if length <= 0 or data[pos + length - 1:pos + length] != b"\n":
                raise ValueError
            key, value = data[space + 1:pos + length - 1].split(b"=", 1)
            text_key, text = key.decode("utf-8"), value.decode("utf-8")
        except ValueError:  # UnicodeDecodeError too
            raise UnusualTar("an unreadable PAX header") from None
        if text_key not in ("path", "linkpath", "size", "uid", "gid") and text_key not in _IGNORED_PAX:
            raise UnusualTar(f"a PAX {text_key!r} record")
        records[text_key] = text
        pos += length
    return records
