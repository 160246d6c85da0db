"""Hostile packages: nothing of the host reaches a layer, nothing unbounded is unpacked.

Each package here is what an attacker with write access to a channel could publish. The
archive is real (tests/fixtures/condapkg.py writes what conda-build writes, then lies in
its declaration), the channel is indexed by rattler, and the layer is built by the same
code as a pull. A refused package must leave nothing behind: no layer file in the work
directory, no cached archive, and no byte of the host file it aimed at anywhere.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import rattler

from condery.layers import PackageError
from condery.layers.members import PackageLimits
from condery.layers.package_layer import build_package_layer
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package

PREFIX = "/opt/conda"
TEXT_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"


def _file(path: str, content: bytes = b"", **kw) -> dict:
    import hashlib

    return {"_path": path, "path_type": "hardlink", "sha256": hashlib.sha256(content).hexdigest(),
            "size_in_bytes": len(content), **kw}


def _link(path: str) -> dict:
    return {"_path": path, "path_type": "softlink", "sha256": "0" * 64, "size_in_bytes": 1}


@pytest.fixture(scope="module")
def secret_dir() -> Path:
    """A host directory with a secret file in it: what the packages try to read."""
    path = Path("/tmp") / f"condery-secret-{secrets.token_hex(4)}"
    path.mkdir()
    (path / "shadow").write_text(f"root:{secrets.token_hex(16)}:19000:0:99999:7:::\n")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def hostile_packages(ch: Path, secret: Path) -> None:
    """One package per way of reaching outside the package's own files."""
    shadow = str(secret / "shadow")
    # The issue's case: an undeclared symlink to a host directory, a "file" below it.
    write_conda_package(ch, "etclink", "1.0", "h0", files=[PkgFile("share/etc", symlink_to=str(secret))],
                        paths=[_file("share/etc/shadow", b"x")])
    # A symlink to /proc declared as a text file with a placeholder (replacement reads it).
    write_conda_package(ch, "procenv", "1.0", "h0", files=[PkgFile("share/env", symlink_to="/proc/self/environ")],
                        paths=[_file("share/env", b"x", file_mode="text", prefix_placeholder=TEXT_PLACEHOLDER)])
    # A declared symlink to a directory, with a declared file below it.
    write_conda_package(ch, "dirlink", "1.0", "h0", files=[PkgFile("share/d", symlink_to=str(secret))],
                        paths=[_link("share/d"), _file("share/d/shadow", b"x")])
    # A chain: a -> b -> host directory; the file below a.
    write_conda_package(ch, "chain", "1.0", "h0",
                        files=[PkgFile("share/a", symlink_to="b"), PkgFile("share/b", symlink_to=str(secret))],
                        paths=[_link("share/a"), _link("share/b"), _file("share/a/shadow", b"x")])
    # A symlink declared as a file.
    write_conda_package(ch, "linkasfile", "1.0", "h0", files=[PkgFile("share/f", symlink_to=shadow)],
                        paths=[_file("share/f", b"x")])
    # A declared softlink that claims a placeholder (the installer would rewrite its target file).
    write_conda_package(ch, "linkplaceholder", "1.0", "h0", files=[PkgFile("share/f", symlink_to=shadow)],
                        paths=[_link("share/f") | {"file_mode": "text", "prefix_placeholder": TEXT_PLACEHOLDER}])
    # A file listed twice.
    write_conda_package(ch, "twice", "1.0", "h0", files=[PkgFile("share/t", b"t")],
                        paths=[_file("share/t", b"t"), _file("share/t", b"t")])
    # A hardlink member pointing at a symlink to the secret.
    write_conda_package(ch, "hardtolink", "1.0", "h0",
                        files=[PkgFile("share/a-link", symlink_to=shadow), PkgFile("share/b-hard", hardlink_to="share/a-link")],
                        paths=[_link("share/a-link"), _file("share/b-hard", b"x")])
    # An archive member the declaration does not list.
    write_conda_package(ch, "undeclared", "1.0", "h0", files=[PkgFile("share/ok", b"ok"), PkgFile("share/extra", b"e")],
                        paths=[_file("share/ok", b"ok")])
    # Old packages (info/files only): has_prefix naming a symlink; an unlisted member.
    write_conda_package(ch, "legacylink", "1.0", "h0", files=[PkgFile("share/env", symlink_to="/proc/self/environ")],
                        legacy_files=["share/env"], has_prefix=f"{TEXT_PLACEHOLDER} text share/env\n")
    write_conda_package(ch, "legacyextra", "1.0", "h0", files=[PkgFile("share/ok", b"ok"), PkgFile("share/x", b"x")],
                        legacy_files=["share/ok"])
    write_conda_package(ch, "legacygood", "1.0", "h0",
                        files=[PkgFile("bin/tool", f"#!/bin/sh\necho {TEXT_PLACEHOLDER}\n".encode(), 0o755),
                               PkgFile("bin/tool2", symlink_to="tool")],
                        legacy_files=["bin/tool", "bin/tool2"], has_prefix=f"{TEXT_PLACEHOLDER} text bin/tool\n")
    # Whiteouts would delete other layers' files when a client unpacks the image.
    write_conda_package(ch, "whiteout", "1.0", "h0", files=[PkgFile("lib/.wh.libc.so.6", b"")])
    write_conda_package(ch, "opaque", "1.0", "h0", files=[PkgFile("lib/.wh..wh..opq", b"")])
    write_conda_package(ch, "newline", "1.0", "h0", files=[PkgFile("bin/evil\nname", b"")])
    write_conda_package(ch, "escape2", "1.0", "h0", files=[PkgFile("share/x", b"x")], paths=[_file("../x", b"x")])
    # Bombs: 64 MiB of zeros in a few KB; many empty files.
    write_conda_package(ch, "bomb", "1.0", "h0", fmt="conda", files=[PkgFile("share/zeros", bytes(64 << 20))])
    write_conda_package(ch, "manyfiles", "1.0", "h0", files=[PkgFile(f"share/m/{i:04d}", b"") for i in range(300)])


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory, secret_dir: Path) -> Path:
    ch = tmp_path_factory.mktemp("hostile")
    hostile_packages(ch, secret_dir)
    index_channel(ch)
    return ch


async def record_of(channel: Path, name: str) -> rattler.RepoDataRecord:
    records = await rattler.solve([rattler.Channel(channel.as_uri())], [name], platforms=["linux-64", "noarch"])
    return next(r for r in records if r.name.normalized == name)


async def build(record: rattler.RepoDataRecord, tmp: Path, limits: PackageLimits = PackageLimits()):
    return await build_package_layer(record, python_record=None, prefix=PREFIX, platform="linux-64",
                                     work_dir=tmp / "work", package_cache_dir=tmp / "pkgs", limits=limits)


def assert_nothing_left(tmp: Path, secret: Path | None = None) -> None:
    work = tmp / "work"
    assert not work.exists() or list(work.iterdir()) == [], list(work.iterdir())
    assert not [p for p in (tmp / "pkgs").rglob("*") if p.is_file()]
    if secret is not None:
        needle = (secret / "shadow").read_bytes().strip()
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert needle not in path.read_bytes(), path


@pytest.mark.parametrize(("name", "message"), [
    ("etclink", "below the symlink 'share/etc'"),
    ("procenv", "'share/env' is declared a file but the archive holds a symlink"),
    ("dirlink", "below the symlink 'share/d'"),
    ("chain", "below the symlink 'share/a'"),
    ("linkasfile", "declared a file but the archive holds a symlink"),
    ("linkplaceholder", "declared to hold a prefix placeholder"),
    ("twice", "lists 'share/t' twice"),
    ("hardtolink", "does not point at a regular file"),
    ("undeclared", "'share/extra', which its info/paths.json does not list"),
    ("legacylink", "the symlink 'share/env' is declared to hold a prefix placeholder"),
    ("legacyextra", "'share/x', which its info/files does not list"),
    ("whiteout", "whiteout"),
    ("opaque", "whiteout"),
    ("newline", "unsafe path"),
    ("escape2", "unsafe path"),
])
async def test_refused_and_nothing_leaks(channel: Path, tmp_path: Path, secret_dir: Path, name: str,
                                         message: str) -> None:
    record = await record_of(channel, name)
    with pytest.raises(PackageError, match=message) as err:
        await build(record, tmp_path)
    assert str(err.value).startswith(f"{name}-1.0-h0: ")  # names the package
    assert str(tmp_path) not in str(err.value) and str(secret_dir) not in str(err.value).replace(
        f"{secret_dir}'", "")  # a symlink target may be quoted; no local path of ours is
    assert_nothing_left(tmp_path, secret_dir)


async def test_old_package_without_paths_json_still_builds(channel: Path, tmp_path: Path) -> None:
    blob = await build(await record_of(channel, "legacygood"), tmp_path)
    with tarfile.open(blob.path, "r:gz") as tar:
        tool = tar.extractfile("opt/conda/bin/tool").read()
        assert tar.getmember("opt/conda/bin/tool2").issym()
    assert b"/opt/conda" in tool and TEXT_PLACEHOLDER.encode() not in tool


async def test_unpacked_size_is_bounded_before_anything_is_written(channel: Path, tmp_path: Path) -> None:
    record = await record_of(channel, "bomb")
    assert record.size < 1 << 20  # a small download...
    started = time.monotonic()
    with pytest.raises(PackageError, match="unpacks to more than 16777216 bytes"):
        await build(record, tmp_path, PackageLimits(max_unpacked_bytes=16 << 20))
    assert time.monotonic() - started < 5  # refused from the header, not after inflating
    assert_nothing_left(tmp_path)
    # Within the bound, the same package builds.
    blob = await build(record, tmp_path / "ok", PackageLimits(max_unpacked_bytes=128 << 20))
    assert blob.size < 1 << 20


async def test_file_count_is_bounded(channel: Path, tmp_path: Path) -> None:
    record = await record_of(channel, "manyfiles")
    with pytest.raises(PackageError, match="more than 100 files"):
        await build(record, tmp_path, PackageLimits(max_files=100))
    assert_nothing_left(tmp_path)
    await build(record, tmp_path / "ok", PackageLimits(max_files=1000))


def test_layer_writer_never_reads_through_a_symlink(tmp_path: Path, secret_dir: Path) -> None:
    """Defence in depth: a file scanned as regular and swapped for a symlink is refused."""
    from condery.layers import tarball

    root = tmp_path / "root"
    (root / "share").mkdir(parents=True)
    (root / "share" / "f").write_bytes(b"x" * 10)
    entries = tarball._scan(root, "opt/conda", ())
    os.unlink(root / "share" / "f")
    os.symlink(secret_dir / "shadow", root / "share" / "f")
    writer = tarball._LayerWriter(tmp_path / "out.tar.gz")
    with pytest.raises(PackageError, match="became a symlink"):
        for entry in entries:
            writer.add(entry)
    writer.abort()


async def test_download_is_bounded_by_the_repodata_size(tmp_path: Path) -> None:
    """A channel serving more bytes than its repodata promises is cut off, nothing kept."""
    import json

    from condery.layers.package_layer import fetch_verified
    from tests.fixtures.token_channel import token_channel

    ch = tmp_path / "ch"
    write_conda_package(ch, "big", "1.0", "h0", files=[PkgFile("share/big", secrets.token_bytes(4 << 20))])
    index_channel(ch)
    repodata_path = ch / "linux-64" / "repodata.json"
    repodata = json.loads(repodata_path.read_text())
    repodata["packages"]["big-1.0-h0.tar.bz2"]["size"] = 1000
    repodata_path.write_text(json.dumps(repodata))
    with token_channel(ch, "tok", "u", "p") as channel:
        records = await rattler.solve([rattler.Channel(channel.url.replace("u:p@", ""))], ["big"],
                                      platforms=["linux-64", "noarch"])
        with pytest.raises(PackageError, match="serves more than the 1000 bytes"):
            await fetch_verified(records[0], tmp_path / "pkgs")
    assert not [p for p in (tmp_path / "pkgs").rglob("*") if p.is_file()]


async def test_unreachable_channel_is_a_passing_fault(tmp_path: Path) -> None:
    from condery.layers import PackageUnavailable
    from tests.fixtures.token_channel import token_channel

    ch = tmp_path / "ch"
    write_conda_package(ch, "small", "1.0", "h0", files=[PkgFile("share/s", b"s")])
    index_channel(ch)
    with token_channel(ch, "tok", "u", "p") as channel:
        url = channel.url.replace("u:p@", "")
        records = await rattler.solve([rattler.Channel(url)], ["small"], platforms=["linux-64", "noarch"])
    # The server is gone now: the download fails for a passing reason, not the package's.
    with pytest.raises(PackageUnavailable, match="small-1.0-h0: download failed from http://127.0.0.1"):
        await build(records[0], tmp_path)
    assert_nothing_left(tmp_path)
