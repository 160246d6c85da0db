"""Deterministic layer tarballs: byte-identical output, safe members, streamed digests."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from condery.layers import PackageError
from condery.layers.tarball import LAYER_MTIME, _Entry, concat_layers, tar_header, tar_info, write_layer


def make_tree(root: Path, *, mtime: int = 1234567890) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "sub").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o4750)  # setuid and odd bits are normalised away
    (root / "lib" / "libx.so.1").write_bytes(b"\x7fELF" + bytes(range(256)) * 100)
    (root / "lib" / "libx.so.1").chmod(0o600)
    os.symlink("libx.so.1", root / "lib" / "libx.so")
    os.symlink("../lib/libx.so.1", root / "bin" / "libx-link")
    os.link(root / "lib" / "libx.so.1", root / "lib" / "sub" / "hard")
    (root / "empty").mkdir()
    (root / ("d" * 120)).mkdir()
    (root / ("d" * 120) / ("f" * 120)).write_bytes(b"long name")
    (root / "ünïcode.txt").write_bytes(b"u")
    for p in root.rglob("*"):
        os.utime(p, (mtime, mtime), follow_symlinks=False)
    return root


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: m for m in tar.getmembers()}


def test_layer_is_deterministic_and_normalised(tmp_path: Path) -> None:
    a = write_layer(make_tree(tmp_path / "a", mtime=1), "opt/conda", tmp_path / "a.tgz")
    b = write_layer(make_tree(tmp_path / "b", mtime=2_000_000_000), "opt/conda", tmp_path / "b.tgz")
    assert a.digest == b.digest and a.diff_id == b.diff_id
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()

    data = (tmp_path / "a.tgz").read_bytes()
    assert a.size == len(data)
    assert a.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert a.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    assert data[4:8] == b"\0\0\0\0"  # gzip MTIME
    assert data[3] & 0x08 == 0  # no FNAME flag

    ms = members(tmp_path / "a.tgz")
    names = list(ms)
    # Directories first (a group layer writes them once: concat.py), then the rest, each sorted.
    dirs = [n for n in names if ms[n].isdir()]
    assert names == sorted(dirs) + sorted(n for n in names if not ms[n].isdir())
    assert names[:2] == ["opt", "opt/conda"]
    for m in ms.values():
        assert m.mtime == LAYER_MTIME and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""
        assert m.name == "opt" or m.name.startswith("opt/conda")
    assert ms["opt/conda/bin/tool"].mode == 0o755
    assert ms["opt/conda/lib/libx.so.1"].mode == 0o644
    assert ms["opt/conda/empty"].isdir() and ms["opt/conda/empty"].mode == 0o755
    assert ms["opt/conda/lib/libx.so"].issym() and ms["opt/conda/lib/libx.so"].linkname == "libx.so.1"
    hard = ms["opt/conda/lib/sub/hard"]  # a hardlink of lib/libx.so.1, which sorts first
    assert hard.islnk() and hard.linkname == "opt/conda/lib/libx.so.1"
    assert f"opt/conda/{'d' * 120}/{'f' * 120}" in ms
    assert "opt/conda/ünïcode.txt" in ms


def test_layer_extracts_with_gnu_tar(tmp_path: Path) -> None:
    blob = write_layer(make_tree(tmp_path / "t"), "opt/conda", tmp_path / "t.tgz")
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(blob.path), "-C", str(out)], check=True)
    assert (out / "opt/conda/bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(out / "opt/conda/bin/tool", os.X_OK)
    assert (out / "opt/conda/bin/libx-link").resolve() == (out / "opt/conda/lib/libx.so.1").resolve()


def test_extra_dirs_and_empty_prefix(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "f").write_text("x")
    blob = write_layer(root, "", tmp_path / "l.tgz", extra_dirs=["opt/conda/etc/conda/activate.d"])
    assert list(members(blob.path)) == [
        "etc", "opt", "opt/conda", "opt/conda/etc", "opt/conda/etc/conda",
        "opt/conda/etc/conda/activate.d", "etc/f",
    ]


@pytest.mark.parametrize("target", ["../../../../etc/shadow", "a/../../../../../x"])
def test_symlink_above_root_is_refused(tmp_path: Path, target: str) -> None:
    root = tmp_path / "r"
    (root / "lib").mkdir(parents=True)
    os.symlink(target, root / "lib" / "evil")
    with pytest.raises(PackageError, match="outside the image root"):
        write_layer(root, "opt/conda", tmp_path / "l.tgz")
    assert not (tmp_path / "l.tgz").exists()


def test_symlinks_inside_root_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "lib").mkdir(parents=True)
    os.symlink("../../../etc/ssl/certs", root / "lib" / "certs")  # /etc/ssl/certs in the image
    os.symlink("/etc/ssl/cert.pem", root / "lib" / "abs")
    ms = members(write_layer(root, "opt/conda", tmp_path / "l.tgz").path)
    assert ms["opt/conda/lib/certs"].linkname == "../../../etc/ssl/certs"
    assert ms["opt/conda/lib/abs"].linkname == "/etc/ssl/cert.pem"


def test_special_files_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(PackageError, match="not a file"):
        write_layer(root, "opt/conda", tmp_path / "l.tgz")


def test_concat_layers(tmp_path: Path) -> None:
    def layer(name: str, files: dict[str, bytes]) -> Path:
        root = tmp_path / name
        for rel, content in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(content)
        return write_layer(root, "opt/conda", tmp_path / f"{name}.tgz").path

    a = layer("a", {"bin/a": b"A", "share/x": b"old"})
    b = layer("b", {"bin/b": b"B", "share/x": b"new", "lib/l": b"L"})
    blob = concat_layers([a, b], tmp_path / "ab.tgz")
    again = concat_layers([a, b], tmp_path / "ab2.tgz")
    assert blob.digest == again.digest

    with tarfile.open(blob.path, "r:gz") as tar:
        names = tar.getnames()
        assert len(names) == len(set(names))  # directories once, files once
        assert set(names) == {"opt", "opt/conda", "opt/conda/bin", "opt/conda/bin/a", "opt/conda/bin/b",
                              "opt/conda/share", "opt/conda/share/x", "opt/conda/lib", "opt/conda/lib/l"}
        assert tar.extractfile("opt/conda/share/x").read() == b"new"  # the later layer wins
        assert tar.extractfile("opt/conda/bin/a").read() == b"A"

    c = layer("c", {"bin/a/inner": b"dir now"})
    with pytest.raises(PackageError, match="bin/a"):
        concat_layers([a, c], tmp_path / "ac.tgz")
    assert not (tmp_path / "ac.tgz").exists()


def test_concat_refuses_unsafe_members(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("opt/../../etc/passwd")
        tar.addfile(info)
    with pytest.raises(PackageError, match="unsafe path"):
        concat_layers([bad], tmp_path / "out.tgz")


def test_hardlinks_are_written_once(tmp_path: Path) -> None:
    """One 2 MiB file with 20 links is 2 MiB in the layer, not 42, and unpacks as links."""
    root = tmp_path / "root"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "big").write_bytes(os.urandom(2 << 20))
    for i in range(20):
        os.link(root / "lib" / "big", root / "lib" / f"link{i:02d}")
    blob = write_layer(root, "opt/conda", tmp_path / "layer.tgz")
    assert blob.size < (2 << 20) + (64 << 10)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(blob.path), "-C", str(out)], check=True)
    inodes = {(out / "opt/conda/lib" / n).stat().st_ino for n in ["big", *(f"link{i:02d}" for i in range(20))]}
    assert len(inodes) == 1


def test_layer_dates_are_zip_safe(tmp_path: Path) -> None:
    """mtime 0 (1970) makes zipfile refuse files copied out of an image; 1980 does not."""
    import zipfile

    blob = write_layer(make_tree(tmp_path / "t"), "opt/conda", tmp_path / "l.tgz")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(blob.path), "-C", str(out)], check=True)
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.write(out / "opt/conda/bin/tool", "tool")


def test_concat_keeps_hardlinks(tmp_path: Path) -> None:
    root = tmp_path / "a"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 1000)
    os.link(root / "f", root / "g")
    first = write_layer(root, "opt/conda", tmp_path / "a.tgz")
    other = tmp_path / "b"
    other.mkdir()
    (other / "h").write_bytes(b"y")
    second = write_layer(other, "opt/conda", tmp_path / "b.tgz")
    merged = concat_layers([first.path, second.path], tmp_path / "m.tgz")
    ms = members(merged.path)
    assert ms["opt/conda/g"].islnk() and ms["opt/conda/g"].linkname == "opt/conda/f"
    # A later layer replacing the link's target cannot be expressed in one layer: refused.
    (other / "f").write_bytes(b"z")
    replacing = write_layer(other, "opt/conda", tmp_path / "c.tgz")
    with pytest.raises(PackageError, match="another layer replaces"):
        concat_layers([first.path, replacing.path], tmp_path / "n.tgz")


@pytest.mark.parametrize("entry", [
    _Entry("opt", "dir"), _Entry("opt/conda/bin/tool", "file", 0o755, 12345), _Entry("opt/conda/f", "file", 0o644, 0),
    _Entry("opt/conda/lib/libx.so", "symlink", 0o777, linkname="libx.so.1"),
    _Entry("opt/conda/lib/sub/hard", "hardlink", 0o644, linkname="opt/conda/lib/libx.so.1"),
    _Entry("home/jovyan", "dir", uid=1000, gid=100), _Entry("d" * 99, "dir"), _Entry("d" * 100, "dir"),
    _Entry("f" * 100, "file", 0o644, 1), _Entry("f" * 101, "file", 0o644, 1), _Entry("ünïcode.txt", "file", 0o644, 3),
    _Entry("l", "symlink", 0o777, linkname="t" * 101), _Entry("big", "file", 0o644, 9 << 30),
])
def test_tar_headers_are_tarfiles(entry: _Entry) -> None:
    """The layer writer's own headers (tar_header) are the bytes tarfile's PAX writer gives."""
    expected = tar_info(entry).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    assert tar_header(entry) == expected
