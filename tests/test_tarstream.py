"""The lean tar reader (condery/layers/tarstream.py) gives what tarfile gives for the tar
that conda's packagers and condery's layer writer write, in every format Python's tarfile
writes them, and declines (UnusualTar) what it leaves to tarfile."""

from __future__ import annotations

import io
import tarfile

import pytest

from condery.layers.tarstream import BLOCK, TarReader, UnusualTar

NAMES = ["bin/tool", "lib/" + "deep/" * 40 + "libx.so", "share/caf\u00e9/na\u00efve.txt", "share/empty"]


def archive(fmt: int, extra: dict | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for directory in ("bin", "lib", "share"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for i, name in enumerate(NAMES):
            info = tarfile.TarInfo(name)
            data = (f"content {i}\n" * (i * 300)).encode()
            info.size, info.mode = len(data), 0o755 if i == 0 else 0o644
            if extra and i == 1:
                info.pax_headers = extra
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("share/" + "l" * 120)
        link.type, link.linkname = tarfile.SYMTYPE, "../" + "t" * 150
        tar.addfile(link)
        hard = tarfile.TarInfo("bin/tool-again")
        hard.type, hard.linkname = tarfile.LNKTYPE, "bin/tool"
        tar.addfile(hard)
    return raw.getvalue()


def with_tarfile(data: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            kind = {tarfile.REGTYPE: "file", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
                    tarfile.LNKTYPE: "hardlink"}[info.type]
            content = tar.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            out.append((info.name.rstrip("/") if info.isdir() else info.name, kind,
                        info.size if info.isreg() else 0, info.linkname, info.mode, content))
        end = tar.offset
    return out + [end]


def with_reader(data: bytes, read_size: int = 1 << 20) -> list[tuple]:
    class Chunked(io.BytesIO):  # a decompressor gives fewer bytes than asked
        def read(self, n: int = -1) -> bytes:
            return super().read(min(n, read_size) if n >= 0 else read_size)

    reader = TarReader(Chunked(data))
    out = []
    for entry in reader.entries():
        content = reader.read_content(entry.size) if entry.kind == "file" else None
        out.append((entry.name, entry.kind, entry.size, entry.linkname, entry.mode, content))
    return out + [reader.end]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
@pytest.mark.parametrize("read_size", [1 << 20, 1000, 7])
def test_what_tarfile_writes_reads_as_tarfile_reads_it(fmt: int, read_size: int) -> None:
    data = archive(fmt)
    assert with_reader(data, read_size) == with_tarfile(data)


def test_ustar_prefix_and_a_v7_directory() -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("a/" + "p" * 120 + "/file")  # name and prefix fields
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        old = tarfile.TarInfo("olddir/")
        old.type = tarfile.AREGTYPE  # "\0" with a trailing slash: a directory to tarfile
        tar.addfile(old)
    data = raw.getvalue()
    assert with_reader(data) == with_tarfile(data)
    assert with_reader(data)[1][1] == "dir"


def test_contents_not_read_are_skipped() -> None:
    data = archive(tarfile.PAX_FORMAT)
    reader = TarReader(io.BytesIO(data))
    names = [entry.name for entry in reader.entries()]  # no content read at all
    assert names == [row[0] for row in with_tarfile(data)[:-1]]


def test_a_signed_checksum_is_taken_as_tarfile_takes_it() -> None:
    data = bytearray(archive(tarfile.PAX_FORMAT))
    header = data[:BLOCK]
    header[0:4] = "\u00e9t\u00e9".encode()[:4]  # bytes of 0x80 and more in the name
    signed = 256 + sum(b - 256 if b >= 128 else b for b in header[:148] + header[156:])
    header[148:156] = f"{signed:06o}\0 ".encode()
    data[:BLOCK] = header
    assert with_reader(bytes(data)) == with_tarfile(bytes(data))


def rechecked(data: bytes) -> bytes:
    """The first header's checksum made right again after a change."""
    header = bytearray(data[:BLOCK])
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header) + data[BLOCK:]


@pytest.mark.parametrize("change,reason", [
    ("xattr", "SCHILY"),
    ("global", "type"),
    ("base256", "base-256"),
    ("checksum", "checksum"),
    ("truncated", "ends"),
    ("symlink-content", "content behind"),
    ("endless-pax", "extended headers"),
])
def test_what_it_leaves_to_tarfile(change: str, reason: str) -> None:
    if change == "xattr":
        data = archive(tarfile.PAX_FORMAT, {"SCHILY.xattr.user.x": "1"})
    elif change == "global":
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "g"}) as tar:
            tar.addfile(tarfile.TarInfo("x"))
        data = raw.getvalue()
    elif change == "base256":
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
            info = tarfile.TarInfo("big-uid")
            info.uid = 1 << 40  # written base-256 in GNU format
            tar.addfile(info)
        data = rechecked(raw.getvalue()[:100] + b"\x80" + bytes(7) + raw.getvalue()[108:])  # mode, base-256
    elif change == "checksum":
        data = archive(tarfile.PAX_FORMAT)
        data = data[:148] + b"0000001\0" + data[156:]
    elif change == "endless-pax":  # PAX headers without an entry after them
        one = archive(tarfile.PAX_FORMAT, {"comment": "x"})
        start = next(i for i in range(0, len(one), BLOCK) if one[i + 156:i + 157] == b"x")
        pax = one[start:start + 2 * BLOCK]
        data = pax * 20 + bytes(2 * BLOCK)
    elif change == "truncated":
        data = archive(tarfile.PAX_FORMAT)[:BLOCK * 5 + 100]
    else:
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("link")
            info.type, info.linkname = tarfile.SYMTYPE, "target"
            tar.addfile(info)
        data = raw.getvalue()
        data = rechecked(data[:124] + b"00000000012\0" + data[136:])  # a size on a symlink
    with pytest.raises(UnusualTar, match=reason):
        with_reader(data)
