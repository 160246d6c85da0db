"""Layers written straight from the archive (condery/layers/stream_layer.py) are the
layers rattler's install gives, byte for byte: on every real package of the fixtures,
the python fixture, the repackaged numpy/scipy/pandas/matplotlib closure, and generated
edge cases (text and binary placeholders, shebangs rattler rewrites, softlinks, tar
hardlinks, noarch python with entry points, bytecode, .tar.bz2 and .conda)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import rattler

from condery.layers.activation_scripts import PackageScripts, read_package_scripts
from condery.layers.bytecode import HostInterpreters, bytecode_for, plan_bytecode
from condery.layers.members import PackageLimits, UnusualArchive, iter_archive
from condery.layers.package_layer import build_package_layer, python_site_packages
from condery.layers.stream_layer import NotStreamable, replace_binary, replace_text
from condery.layers.workers import LayerWorkers
from tests.fixtures.channel import ANACONDA_2020, build_fixture_channel
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.wheel_packages import wheel_packages

PREFIX = "/opt/conda"
LONG = "/home/conda/feedstock_root/build_artifacts/pkg_1700000000000/_h_env_" + "placehold_" * 12
INSTALLED = "installed with rattler"


def write_edge_cases(ch: Path) -> None:
    long_py = f"#!{LONG}/bin/python3.11 -E\nimport sys\nprint('{LONG}')\n".encode()
    for fmt in ("tar.bz2", "conda"):
        write_conda_package(ch, f"edge-{fmt.replace('.', '')}", "1.0", "h0", fmt=fmt, files=[
            PkgFile("bin/long-python", long_py, 0o755, placeholder=LONG, file_mode="text"),
            PkgFile("bin/long-perl", f"#!{LONG}/bin/perl -w\nprint 1;\n".encode(), 0o755,
                    placeholder=LONG, file_mode="text"),
            PkgFile("bin/short", f"#!{LONG[:20]}/sh\n# {LONG} twice {LONG}\n".encode(), 0o755,
                    placeholder=LONG, file_mode="text"),
            PkgFile("bin/plain-shebang", b"#!/bin/sh\necho " + LONG.encode() + b"\n", 0o755,
                    placeholder=LONG, file_mode="text"),
            PkgFile("lib/libbin.so", b"\x7fELF\0" + LONG.encode() + b"/lib:" + LONG.encode() + b"/x\0tail\0"
                    + LONG.encode() + b"\0\0end", 0o755, placeholder=LONG, file_mode="binary"),
            PkgFile("lib/unterminated.bin", b"head\0" + LONG.encode() + b"/no-nul", placeholder=LONG,
                    file_mode="binary"),
            PkgFile("share/edge/data.txt", b"plain\n"),
            PkgFile("share/edge/link", symlink_to="data.txt"),
            PkgFile("share/edge/up", symlink_to="../../lib/libbin.so"),
            PkgFile("share/edge/dangling", symlink_to="nowhere"),
            PkgFile("share/edge/ro.txt", b"read only\n", 0o444),
        ])
    write_conda_package(ch, "edge-hardlink", "1.0", "h0", fmt="conda", files=[
        PkgFile("share/h/a.txt", b"shared bytes\n"),
        PkgFile("share/h/b.txt", hardlink_to="share/h/a.txt"),
    ])
    write_conda_package(ch, "edge-abslink", "1.0", "h0", files=[
        PkgFile("share/abs", symlink_to="/etc/hostname"),
    ])
    write_conda_package(ch, "edge-nosha", "1.0", "h0", files=[PkgFile("share/nosha.txt", b"x\n")],
                        paths=[{"_path": "share/nosha.txt", "path_type": "hardlink"}])
    write_conda_package(ch, "edge-py", "1.0", "py311h0", fmt="conda", depends=["python"], files=[
        PkgFile("lib/python3.11/site-packages/edgepy/__init__.py", b"X = 1\n"),
        PkgFile("lib/python3.11/site-packages/edgepy/bad.py", b"def (:\n"),
        PkgFile("lib/python3.11/site-packages/edgepy/shipped.py", b"Y = 2\n"),
        PkgFile("lib/python3.11/site-packages/edgepy/__pycache__/shipped.cpython-311.pyc", b"not really"),
    ])


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ch = build_fixture_channel(tmp_path_factory.mktemp("stream-channel"))
    for subdir in ("linux-64", "noarch"):
        for archive in sorted((ANACONDA_2020 / subdir).glob("*.conda")):
            shutil.copyfile(archive, ch / subdir / archive.name)
    write_edge_cases(ch)
    index_channel(ch)
    return ch


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory, everything: Path) -> Path:
    ch = tmp_path_factory.mktemp("wheel-channel")
    for subdir in ("linux-64", "noarch"):
        (ch / subdir).mkdir()
        for archive in sorted((wheel_packages() / subdir).glob("*.conda")):
            shutil.copyfile(archive, ch / subdir / archive.name)
    python = next((everything / "linux-64").glob("python-*.conda"))
    shutil.copyfile(python, ch / "linux-64" / python.name)
    index_channel(ch)
    return ch


def records_of(ch: Path) -> list[rattler.RepoDataRecord]:
    channel = rattler.Channel(ch.as_uri())
    out: list[rattler.RepoDataRecord] = []
    for subdir in ("linux-64", "noarch"):
        out.extend(rattler.RepoData.from_path(str(ch / subdir / "repodata.json")).into_repo_data(channel))
    return sorted(out, key=lambda r: r.file_name)


@pytest.fixture(scope="module")
def workers() -> Iterator[LayerWorkers]:
    """Worker processes, as `condery serve` writes streamed layers in (layers/workers.py)."""
    pool = LayerWorkers(2)
    yield pool
    pool.shutdown()


async def compare_both_paths(records: list[rattler.RepoDataRecord], tmp: Path, caplog: pytest.LogCaptureFixture,
                             workers: LayerWorkers) -> tuple[dict[str, str], list[PackageScripts]]:
    """Build every record both ways (streamed in a worker process, installed by rattler);
    assert identical layers (and streamed ones' activation scripts as read from the
    archive); return how each went, and those scripts."""
    python = next(r for r in records if r.name.normalized == "python")
    site = python_site_packages(python)
    plan = await plan_bytecode(python, site, HostInterpreters())
    assert not isinstance(plan, str), plan
    how: dict[str, str] = {}
    scripts_seen: list[PackageScripts] = []
    for record in records:
        bytecode = bytecode_for(record, plan)
        blobs = []
        for stream in (True, False):
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="condery.layers.package_layer"):
                blobs.append(await build_package_layer(
                    record, python_record=python, prefix=PREFIX, platform="linux-64",
                    work_dir=tmp / "work", package_cache_dir=tmp / "pkgs", bytecode=bytecode, stream=stream,
                    workers=workers if stream else None))
            if stream:
                fallback = [r.getMessage() for r in caplog.records if INSTALLED in r.getMessage()]
                how[record.file_name] = fallback[0].split(": ", 2)[-1] if fallback else "streamed"
        streamed, installed = blobs
        assert (streamed.digest, streamed.diff_id, streamed.size) == \
            (installed.digest, installed.diff_id, installed.size), record.file_name
        # A streamed layer brings the package's activation scripts from the same reading of
        # the archive: what read_package_scripts reads from the archive itself.
        if how[record.file_name] == "streamed":
            archive = tmp / "pkgs" / "archives" / (record.sha256 or b"").hex() / record.file_name
            assert streamed.scripts == await read_package_scripts(archive), record.file_name
            scripts_seen.append(streamed.scripts)
        else:
            assert streamed.scripts is None and installed.scripts is None
        assert streamed.path.read_bytes() == installed.path.read_bytes(), record.file_name
        for blob in blobs:
            blob.path.unlink()
    return how, scripts_seen


async def test_fixture_packages_stream_to_the_installed_bytes(everything: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture,
                                                               workers: LayerWorkers) -> None:
    records = records_of(everything)
    how, scripts = await compare_both_paths(records, tmp_path, caplog, workers)
    assert any(s.activate for s in scripts) and any(s.deactivate for s in scripts) and any(s.programs for s in scripts)
    print("\n".join(f"{name}: {way}" for name, way in how.items()))
    streamed = {name for name, way in how.items() if way == "streamed"}
    # Everything streams but what the module declines on purpose.
    declined = {r.file_name: "noarch: python" for r in records if r.noarch.python}
    declined["edge-hardlink-1.0-h0.conda"] = "tar hardlinks"
    declined["edge-abslink-1.0-h0.tar.bz2"] = "a softlink rattler would copy or warn about"
    assert {name: way for name, way in how.items() if way != "streamed"} == declined
    # The real ones: all 27 linux-64 packages of 2020 and tzdata (noarch: generic), and
    # the python fixture (binary placeholders in its 20 MB libpython).
    assert {p.name for p in (ANACONDA_2020 / "linux-64").glob("*.conda")} <= streamed
    assert "tzdata-2020d-h14c3975_0.conda" in streamed
    assert any(name.startswith("python-3") for name in streamed)


async def test_realistic_wheel_packages_stream_to_the_installed_bytes(wheels: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture,
                                                                       workers: LayerWorkers) -> None:
    records = records_of(wheels)
    how, _ = await compare_both_paths(records, tmp_path, caplog, workers)
    print("\n".join(f"{name}: {way}" for name, way in how.items()))
    for record in records:
        if not record.noarch.python:
            assert how[record.file_name] == "streamed", (record.file_name, how[record.file_name])


def test_text_replacement_follows_rattler() -> None:
    old, new = "/old/placeholder/prefix_placehold", "/opt/conda"
    assert replace_text(b"a " + old.encode() + b" b " + old.encode(), old, new) == b"a /opt/conda b /opt/conda"
    assert replace_text(f"#!{old}/bin/python\nx\n".encode(), old, new) == b"#!/opt/conda/bin/python\nx\n"
    long_new = "/" + "x" * 130
    assert replace_text(f"#!{old}/bin/python3.11 -E\n".encode(), old, long_new) == (
        f"#!/bin/sh\n'''exec' \"{long_new}/bin/python3.11\" -E \"$0\" \"$@\" #'''\n".encode())
    assert replace_text(f"#!{old}/bin/perl -w\n".encode(), old, long_new) == b"#!/usr/bin/env perl -w\n"
    assert replace_text(f"#!{old}/bin/perl\n".encode(), old, "/with space") == b"#!/usr/bin/env perl\n"
    with pytest.raises(NotStreamable):
        replace_text(b"#!" + old.encode(), old, new)


def test_binary_replacement_keeps_lengths() -> None:
    old, new = "/old/placeholder/prefix_placehold", "/opt/conda"
    data = b"\0" + old.encode() + b"/lib:" + old.encode() + b"/x\0rest"
    out = replace_binary(data, old, new)
    assert len(out) == len(data)
    assert out == b"\0/opt/conda/lib:/opt/conda/x" + b"\0" * (2 * (len(old) - len(new))) + b"\0rest"
    with pytest.raises(NotStreamable):
        replace_binary(data, new, old)


def members_and_bytes(archive: Path, lean: bool) -> list[tuple]:
    out = []
    for member, content, mode in iter_archive(archive, PackageLimits(), lean=lean):
        out.append((member, mode, content.read(member.size) if content is not None else None))
    return out


def test_the_lean_tar_reader_reads_every_fixture_archive_as_tarfile_does(everything: Path, wheels: Path) -> None:
    """members.iter_archive(lean=True) (tarstream.py) against tarfile on every real and
    generated archive the streaming tests use: members, modes and bytes."""
    archives = sorted({*everything.glob("*/*.conda"), *everything.glob("*/*.tar.bz2"), *wheels.glob("*/*.conda")})
    assert len(archives) > 40
    for archive in archives:
        try:
            lean = members_and_bytes(archive, lean=True)
        except UnusualArchive as exc:
            raise AssertionError(f"{archive.name}: the lean reader declined it ({exc})") from None
        assert lean == members_and_bytes(archive, lean=False), archive.name
