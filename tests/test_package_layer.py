"""Package layers from real conda packages: generated edge cases and real anaconda ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import rattler

from condery.layers import LayerBlob, PackageError
from condery.layers.tarball import LAYER_MTIME
from condery.records.keys import layer_key
from condery.layers.package_layer import (
    LAYOUT_VERSION,
    build_package_layer,
    python_site_packages,
)
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/fixtures")
ANACONDA = FIXTURES / "anaconda-main-2020"
PREFIX = "/opt/conda"
# conda-build's long placeholder style; binary replacement pads the rest with NULs.
BIN_PLACEHOLDER = "/home/builder/conda-bld/cprog_1700000000/_h_env_placehold_placehold_placehold_placehold"
TEXT_PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"

C_SOURCE = r"""
#include <stdio.h>
static const char where[] = "@P@/share/cprog/data.txt";
int main(void) { puts(where); return 0; }
"""


def compile_cprog(tmp: Path) -> bytes:
    src = tmp / "cprog.c"
    src.write_text(C_SOURCE.replace("@P@", BIN_PLACEHOLDER))
    subprocess.run(["gcc", "-O1", "-o", str(tmp / "cprog"), str(src)], check=True)
    return (tmp / "cprog").read_bytes()


async def solve(channel: Path, specs: list[str]) -> list[rattler.RepoDataRecord]:
    return await rattler.solve([rattler.Channel(channel.as_uri())], specs, platforms=["linux-64", "noarch"])


def by_name(records: list[rattler.RepoDataRecord], name: str) -> rattler.RepoDataRecord:
    return next(r for r in records if r.name.normalized == name)


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ch = tmp_path_factory.mktemp("channel")
    build = tmp_path_factory.mktemp("cbuild")
    write_conda_package(ch, "hello", "1.0", "h0", files=[
        PkgFile("bin/hello", f"#!/bin/sh\necho {TEXT_PLACEHOLDER}/share/hello\n".encode(), 0o755,
                placeholder=TEXT_PLACEHOLDER, file_mode="text"),
        PkgFile("bin/hi", symlink_to="hello"),
        PkgFile("lib/libhello.so.1", b"\x7fELF fake"),
        PkgFile("lib/libhello.so", symlink_to="libhello.so.1"),
        PkgFile("share/hello/README", b"plain\n"),
        PkgFile("share/hello/uplink", symlink_to="../../lib/libhello.so.1"),
    ], depends=["libfoo >=1"])
    write_conda_package(ch, "libfoo", "1.2", "h0", fmt="conda", files=[PkgFile("lib/libfoo.txt", b"foo")])
    write_conda_package(ch, "cprog", "1.0", "h0", fmt="conda", files=[
        PkgFile("bin/cprog", compile_cprog(build), 0o755, placeholder=BIN_PLACEHOLDER, file_mode="binary"),
        PkgFile("share/cprog/data.txt", b"data\n"),
    ])
    write_conda_package(ch, "pyth", "1.2", "pyh0", noarch="python", depends=["python"], files=[
        PkgFile("site-packages/pyth/__init__.py", b"def main():\n    print('pyth')\n"),
        PkgFile("python-scripts/pyth-helper", b"#!/usr/bin/env python\nprint(1)\n", 0o755),
    ], entry_points=["pyth = pyth:main"])
    # A metadata-only python: enough for noarch python to know its site-packages.
    write_conda_package(ch, "python", "3.11.7", "h0_metadata_only", files=[])
    write_conda_package(ch, "empty", "1.0", "h0", files=[])
    write_conda_package(ch, "escape", "1.0", "h0", files=[PkgFile("../../escaped.txt", b"boo")])
    write_conda_package(ch, "throughlink", "1.0", "h0",
                        files=[PkgFile("lib", symlink_to="/tmp"), PkgFile("lib/x", b"through")])
    write_conda_package(ch, "badentry", "1.0", "pyh0", noarch="python", depends=["python"],
                        files=[PkgFile("site-packages/b.py", b"")], entry_points=["../../x = b:main"])
    write_conda_package(ch, "wrongname", "1.0", "h0", files=[])
    write_conda_package(ch, "scripted", "1.0", "h0", files=[
        PkgFile("bin/.scripted-post-link.sh", b'echo ran > "$PREFIX/share-scripted-ran"\n', 0o755),
    ])
    index_channel(ch)
    # Point repodata's wrongname entry at hello's archive (with its true hash).
    repodata_path = ch / "linux-64" / "repodata.json"
    repodata = json.loads(repodata_path.read_text())
    hello = repodata["packages"]["hello-1.0-h0.tar.bz2"]
    shutil.copy(ch / "linux-64" / "hello-1.0-h0.tar.bz2", ch / "linux-64" / "wrongname-1.0-h0.tar.bz2")
    repodata["packages"]["wrongname-1.0-h0.tar.bz2"].update(sha256=hello["sha256"], md5=hello["md5"], size=hello["size"])
    repodata_path.write_text(json.dumps(repodata))
    return ch


@pytest.fixture(scope="module")
def real_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ch = tmp_path_factory.mktemp("real")
    for rel in ("linux-64/xz-5.2.5-h7b6447c_0.conda", "noarch/tqdm-4.54.1-pyhd3eb1b0_0.conda",
                "noarch/tzdata-2020d-h14c3975_0.conda"):
        (ch / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ANACONDA / rel, ch / rel)
    # The fixtures lack these two (too large); metadata-only stand-ins make xz and tqdm solvable.
    write_conda_package(ch, "libgcc-ng", "9.1.0", "hdf63c60_0", license="metadata-only stand-in")
    write_conda_package(ch, "python", "3.9.1", "hdb3f193_2", license="metadata-only stand-in")
    index_channel(ch)
    return ch


async def build(record: rattler.RepoDataRecord, tmp: Path, python: rattler.RepoDataRecord | None = None,
                *, cache: Path | None = None) -> LayerBlob:
    return await build_package_layer(record, python_record=python, prefix=PREFIX, platform="linux-64",
                                     work_dir=tmp / "work", package_cache_dir=cache or tmp / "pkgs")


def extract(blob: LayerBlob, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(blob.path), "-C", str(dest)], check=True)
    return dest / "opt" / "conda"


def check_layer_basics(blob: LayerBlob, record: rattler.RepoDataRecord, *local_paths: Path) -> dict:
    """Every member under opt/conda, and a conda-meta record free of local paths."""
    dist = f"{record.name.normalized}-{record.version}-{record.build}"
    with tarfile.open(blob.path, "r:gz") as tar:
        names = tar.getnames()
        assert names[:2] == ["opt", "opt/conda"]
        assert all(n.startswith("opt/conda/") for n in names[2:]), names
        assert all(m.mtime == LAYER_MTIME and m.uid == 0 for m in tar.getmembers())
        meta_names = [n for n in names if n.startswith("opt/conda/conda-meta/")]
        assert meta_names == [f"opt/conda/conda-meta/{dist}.json"]
        raw = tar.extractfile(meta_names[0]).read().decode()
    for p in local_paths:
        assert str(p) not in raw
    meta = json.loads(raw)
    for key in ("extracted_package_dir", "link", "package_tarball_full_path", "requested_specs"):
        assert key not in meta
    assert meta["name"] == record.name.normalized and meta["sha256"] == record.sha256.hex()
    assert meta["url"] == record.url and meta["channel"] == record.channel
    # The layer holds exactly the recorded files and the record.
    files = {n.removeprefix("opt/conda/") for n in names if n.startswith("opt/conda/")}
    with tarfile.open(blob.path, "r:gz") as tar:
        non_dirs = {m.name.removeprefix("opt/conda/") for m in tar.getmembers() if not m.isdir()}
    assert non_dirs == set(meta["files"]) | {f"conda-meta/{dist}.json"}
    assert files >= non_dirs
    return meta


async def test_condapkg_channel_solves(channel: Path) -> None:
    records = await solve(channel, ["hello", "pyth", "cprog"])
    names = sorted(r.name.normalized for r in records)
    assert names == ["cprog", "hello", "libfoo", "pyth", "python"]
    pyth = by_name(records, "pyth")
    assert pyth.noarch.python and pyth.subdir == "noarch"
    assert by_name(records, "libfoo").file_name.endswith(".conda")


@pytest.mark.parametrize("fmt", ["tar.bz2", "conda"])
def test_condapkg_output_is_deterministic(tmp_path: Path, fmt: str) -> None:
    files = [PkgFile("bin/x", b"x", 0o755), PkgFile("bin/y", symlink_to="x")]
    a = write_conda_package(tmp_path / "a", "det", "1", "h0", files=files, fmt=fmt)
    b = write_conda_package(tmp_path / "b", "det", "1", "h0", files=list(reversed(files)), fmt=fmt)
    assert a.name == f"det-1-h0.{fmt}" and a.read_bytes() == b.read_bytes()


async def test_text_placeholder_and_symlinks(channel: Path, tmp_path: Path) -> None:
    hello = by_name(await solve(channel, ["hello"]), "hello")
    blob = await build(hello, tmp_path)
    check_layer_basics(blob, hello, tmp_path)
    root = extract(blob, tmp_path / "x")
    assert (root / "bin/hello").read_text() == "#!/bin/sh\necho /opt/conda/share/hello\n"
    assert os.access(root / "bin/hello", os.X_OK)
    assert os.readlink(root / "bin/hi") == "hello"
    assert os.readlink(root / "lib/libhello.so") == "libhello.so.1"
    assert os.readlink(root / "share/hello/uplink") == "../../lib/libhello.so.1"
    # The staging directory is gone; only the layer is left in work_dir.
    assert list((tmp_path / "work").iterdir()) == [blob.path]


async def test_binary_placeholder_in_compiled_program(channel: Path, tmp_path: Path) -> None:
    cprog = by_name(await solve(channel, ["cprog"]), "cprog")
    blob = await build(cprog, tmp_path)
    check_layer_basics(blob, cprog, tmp_path)
    root = extract(blob, tmp_path / "x")
    data = (root / "bin/cprog").read_bytes()
    original = compile_cprog(tmp_path)
    assert len(data) == len(original)
    assert BIN_PLACEHOLDER.encode() not in data
    padded = b"/opt/conda/share/cprog/data.txt" + b"\0" * (len(BIN_PLACEHOLDER) - len(PREFIX))
    assert padded in data
    out = subprocess.run([str(root / "bin/cprog")], check=True, capture_output=True, text=True).stdout
    assert out == "/opt/conda/share/cprog/data.txt\n"


async def test_noarch_python_entry_point(channel: Path, tmp_path: Path) -> None:
    records = await solve(channel, ["pyth"])
    pyth, python = by_name(records, "pyth"), by_name(records, "python")
    assert python_site_packages(python) == "lib/python3.11/site-packages"
    blob = await build(pyth, tmp_path, python)
    meta = check_layer_basics(blob, pyth, tmp_path)
    assert "lib/python3.11/site-packages/pyth/__init__.py" in meta["files"]
    root = extract(blob, tmp_path / "x")
    entry = (root / "bin/pyth").read_text()
    assert entry.startswith("#!/opt/conda/bin/python3.11\n") and "from pyth import main" in entry
    assert os.access(root / "bin/pyth", os.X_OK)
    assert (root / "bin/pyth-helper").exists()  # python-scripts/ lands in bin/
    assert not (root / "site-packages").exists() and not (root / "python-scripts").exists()

    with pytest.raises(PackageError, match="no python"):
        await build(pyth, tmp_path / "nopython")


async def test_empty_package(channel: Path, tmp_path: Path) -> None:
    empty = by_name(await solve(channel, ["empty"]), "empty")
    blob = await build(empty, tmp_path)
    meta = check_layer_basics(blob, empty, tmp_path)
    assert meta["files"] == []
    with tarfile.open(blob.path, "r:gz") as tar:
        assert tar.getnames() == ["opt", "opt/conda", "opt/conda/conda-meta", "opt/conda/conda-meta/empty-1.0-h0.json"]


async def test_same_package_same_digest_anywhere(channel: Path, tmp_path: Path) -> None:
    records = await solve(channel, ["hello", "cprog"])
    for name in ("hello", "cprog"):
        record = by_name(records, name)
        first = await build(record, tmp_path / f"{name}-a")
        second = await build(record, tmp_path / f"{name}-b")
        from_cache = await build(record, tmp_path / f"{name}-c", cache=tmp_path / f"{name}-a" / "pkgs")
        assert first.digest == second.digest == from_cache.digest
        assert first.diff_id == second.diff_id and first.size == second.size


def test_layer_key(channel: Path) -> None:
    import asyncio

    records = asyncio.run(solve(channel, ["pyth", "hello"]))
    pyth, hello, python = (by_name(records, n) for n in ("pyth", "hello", "python"))

    def key(record, prefix=PREFIX, site="lib/python3.11/site-packages", scripts=False) -> str:
        return layer_key(record, prefix=prefix, site_packages=site, allow_scripts=scripts)

    assert key(pyth).startswith(f"{LAYOUT_VERSION}/{pyth.sha256.hex()}/")
    assert all(c.isalnum() or c == "/" for c in key(pyth))
    assert key(pyth) == key(pyth)
    assert key(pyth) != key(pyth, site="lib/python3.12/site-packages")
    assert key(pyth) != key(pyth, prefix="/opt/other")
    # Scripts change what the layer holds (their output is kept): never shared.
    assert key(pyth) != key(pyth, scripts=True)
    # The source URL is in conda-meta: the same archive from a mirror is another layer,
    # but the same channel read with credentials is the same one.
    def moved(record, base: str) -> rattler.RepoDataRecord:
        return rattler.RepoDataRecord(record, record.file_name, f"{base}/noarch/{record.file_name}", base)

    assert key(moved(pyth, "https://mirror.example/ch")) != key(pyth)
    assert key(moved(pyth, "https://mirror.example/ch")) == key(moved(pyth, "https://u:secret@mirror.example/ch"))
    assert key(moved(pyth, "https://mirror.example/ch")) == key(moved(pyth, "https://mirror.example/t/tok-123/ch"))
    # Only noarch python layers depend on the python version.
    assert key(hello) == key(hello, site=None)
    # The compressor is an input: a zstd layer is never served for a gzip one.
    assert key(pyth) == layer_key(pyth, prefix=PREFIX, site_packages="lib/python3.11/site-packages",
                                  allow_scripts=False, compression="gzip")
    assert key(pyth) != layer_key(pyth, prefix=PREFIX, site_packages="lib/python3.11/site-packages",
                                  allow_scripts=False, compression="zstd")
    assert python_site_packages(None) is None


async def test_link_scripts_run_only_when_allowed(channel: Path, tmp_path: Path) -> None:
    scripted = by_name(await solve(channel, ["scripted"]), "scripted")

    def names(blob: LayerBlob) -> set[str]:
        with tarfile.open(blob.path, "r:gz") as tar:
            return set(tar.getnames())

    off = await build(scripted, tmp_path / "off")
    check_layer_basics(off, scripted, tmp_path)
    assert "opt/conda/share-scripted-ran" not in names(off)
    on = await build_package_layer(scripted, python_record=None, prefix=PREFIX, platform="linux-64",
                                   work_dir=tmp_path / "on", package_cache_dir=tmp_path / "pkgs",
                                   allow_scripts=True)
    assert "opt/conda/share-scripted-ran" in names(on)


async def test_sha256_mismatch_is_refused(channel: Path, tmp_path: Path) -> None:
    bad = tmp_path / "badchannel"
    shutil.copytree(channel, bad)
    repodata_path = bad / "linux-64" / "repodata.json"
    repodata = json.loads(repodata_path.read_text())
    repodata["packages"]["hello-1.0-h0.tar.bz2"]["sha256"] = "ab" * 32
    repodata_path.write_text(json.dumps(repodata))
    hello = by_name(await solve(bad, ["hello"]), "hello")
    assert hello.sha256.hex() == "ab" * 32

    # What we guard against: rattler itself installs the archive despite the wrong hash.
    # If this starts failing, rattler verifies on its own and our check is a second one.
    await rattler.install([hello], tmp_path / "plain", cache_dir=tmp_path / "rcache", installed_packages=[],
                          show_progress=False, platform=rattler.Subdir("linux-64"))
    assert (tmp_path / "plain" / "bin" / "hello").exists()

    with pytest.raises(PackageError, match="hello-1.0-h0: sha256 mismatch"):
        await build(hello, tmp_path)
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    assert not [p for p in (tmp_path / "pkgs").rglob("*") if p.is_file()]


async def test_corrupted_cache_is_fetched_again(channel: Path, tmp_path: Path) -> None:
    hello = by_name(await solve(channel, ["hello"]), "hello")
    good = await build(hello, tmp_path / "a")
    cached = next(p for p in (tmp_path / "a" / "pkgs").rglob("*.tar.bz2"))
    cached.write_bytes(b"tampered")
    again = await build(hello, tmp_path / "a")
    assert again.digest == good.digest


async def test_archive_that_is_not_the_named_package(channel: Path, tmp_path: Path) -> None:
    wrong = by_name(await solve(channel, ["wrongname"]), "wrongname")
    with pytest.raises(PackageError, match="holds hello-1.0-h0"):
        await build(wrong, tmp_path)


@pytest.mark.parametrize(("spec", "message"), [
    ("escape", "escaped.txt"),
    ("throughlink", "below the symlink"),
    ("badentry", "unsafe entry point"),
])
async def test_unsafe_packages_are_refused(channel: Path, tmp_path: Path, spec: str, message: str) -> None:
    records = await solve(channel, [spec])
    python = next((r for r in records if r.name.normalized == "python"), None)
    through = Path("/tmp/x")  # where throughlink's lib -> /tmp would put its lib/x
    existed = through.exists()  # another process may use that name: judge only what we did
    with pytest.raises(PackageError, match=message):
        await build(by_name(records, spec), tmp_path, python)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path.parent / "escaped.txt").exists()
    assert existed or not through.exists()
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    assert not [p for p in (tmp_path / "pkgs").rglob("*") if p.is_file()]


async def test_malformed_package_is_refused(tmp_path: Path) -> None:
    import hashlib

    source = FIXTURES / "malformed" / "ca-certificates-2024.7.4-hbcca054_0.conda"
    ch = tmp_path / "ch"
    (ch / "linux-64").mkdir(parents=True)
    (ch / "noarch").mkdir()
    shutil.copy(source, ch / "linux-64" / source.name)
    data = source.read_bytes()
    # rattler's indexer cannot read it either, so its repodata entry is written by hand.
    entry = {"name": "ca-certificates", "version": "2024.7.4", "build": "hbcca054_0", "build_number": 0,
             "depends": [], "subdir": "linux-64", "size": len(data), "timestamp": 1720000000000,
             "sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    for sub, packages in (("linux-64", {source.name: entry}), ("noarch", {})):
        (ch / sub / "repodata.json").write_text(json.dumps(
            {"info": {"subdir": sub}, "packages": {}, "packages.conda": packages, "repodata_version": 1}))
    record = by_name(await solve(ch, ["ca-certificates"]), "ca-certificates")
    with pytest.raises(PackageError, match="ca-certificates-2024.7.4-hbcca054_0: not a valid conda package") as err:
        await build(record, tmp_path)
    assert str(tmp_path) not in str(err.value)
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []
    assert not [p for p in (tmp_path / "pkgs").rglob("*") if p.is_file()]


async def test_real_xz_binary_placeholders(real_channel: Path, tmp_path: Path) -> None:
    xz = by_name(await solve(real_channel, ["xz"]), "xz")
    blob = await build(xz, tmp_path)
    check_layer_basics(blob, xz, tmp_path)
    assert (await build(xz, tmp_path / "again")).digest == blob.digest
    root = extract(blob, tmp_path / "x")
    binary = (root / "bin/xz").read_bytes()
    assert TEXT_PLACEHOLDER.encode() not in binary and b"/opt/conda/" in binary
    out = subprocess.run([str(root / "bin/xz"), "--version"], check=True, capture_output=True, text=True).stdout
    assert "5.2.5" in out
    assert os.readlink(root / "bin/unxz") == "xz"
    assert "/opt/conda" in (root / "lib/pkgconfig/liblzma.pc").read_text()


async def test_real_tqdm_and_tzdata(real_channel: Path, tmp_path: Path) -> None:
    records = await solve(real_channel, ["tqdm", "tzdata"])
    tqdm, python, tzdata = (by_name(records, n) for n in ("tqdm", "python", "tzdata"))
    blob = await build(tqdm, tmp_path, python)
    check_layer_basics(blob, tqdm, tmp_path)
    root = extract(blob, tmp_path / "x")
    assert (root / "bin/tqdm").read_text().startswith("#!/opt/conda/bin/python3.9\n")
    assert (root / "lib/python3.9/site-packages/tqdm/__init__.py").exists()

    blob = await build(tzdata, tmp_path / "tz", python)
    check_layer_basics(blob, tzdata, tmp_path)
    root = extract(blob, tmp_path / "tz" / "x")
    assert (root / "share/zoneinfo/Europe/Paris").read_bytes().startswith(b"TZif")
