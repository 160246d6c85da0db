"""Python bytecode compiled into package layers (condery/layers/bytecode.py)."""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest
import rattler

from condery.records.keys import layer_key
from condery.layers import LayerBlob, PackageError
from condery.layers.bytecode import (
    BytecodePlan,
    HostInterpreters,
    _run,
    _Failed,
    bytecode_for,
    plan_bytecode,
    wants_bytecode,
)
from condery.layers.package_layer import build_package_layer, python_site_packages
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package

PREFIX = "/opt/conda"
MAJOR, MINOR = sys.version_info[:2]
TAG = sys.implementation.cache_tag  # cpython-311
SITE = f"lib/python{MAJOR}.{MINOR}/site-packages"
MOD_SOURCE = b'"""A module."""\nKINDS = ("a", "b")\n\ndef kind(x):\n    return x in {"a", "b", "c", "d"}\n'


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ch = tmp_path_factory.mktemp("channel")
    write_conda_package(ch, "pure", "1.0", "pyh0", noarch="python", depends=["python"], files=[
        PkgFile("site-packages/pure/__init__.py", b"from pure.mod import kind\n"),
        PkgFile("site-packages/pure/mod.py", MOD_SOURCE),
        PkgFile("site-packages/pure/py2only.py", b"print 'python 2'\n"),  # conda leaves it without a pyc
        PkgFile("site-packages/pure/data.txt", b"not python\n"),
        PkgFile("site-packages/pure/leak.py", symlink_to="/etc/hostname"),  # never read from the host
    ])
    # Built for one python: ships a pyc for one module and none for the other.
    write_conda_package(ch, "archpy", "1.0", "py_0", depends=[f"python >={MAJOR}.{MINOR},<{MAJOR}.{MINOR + 1}"], files=[
        PkgFile(f"{SITE}/archpy/__init__.py", b"X = 1\n"),
        PkgFile(f"{SITE}/archpy/__pycache__/__init__.{TAG}.pyc", b"shipped by the package"),
        PkgFile(f"{SITE}/archpy/other.py", b"Y = 2\n"),
        PkgFile("share/archpy/tool.py", b"Z = 3\n"),  # not importable: left alone
    ])
    write_conda_package(ch, "nopy", "1.0", "h0", files=[PkgFile("share/nopy/x.py", b"x = 1\n")])
    # A `__pycache__` that is a link to a host directory: compiling must not write through it.
    write_conda_package(ch, "cachelink", "1.0", "pyh0", noarch="python", depends=["python"], files=[
        PkgFile("site-packages/cachelink/__init__.py", b"A = 1\n"),
        PkgFile("site-packages/cachelink/__pycache__", symlink_to="/tmp/condery-test-cachelink-target"),
    ])
    write_conda_package(ch, "python", f"{MAJOR}.{MINOR}.0", "h0_metadata_only", license="metadata-only stand-in")
    write_conda_package(ch, "python", "3.4.0", "h0_metadata_only", license="metadata-only stand-in")
    index_channel(ch)
    return ch


async def solve(channel: Path, specs: list[str]) -> dict[str, rattler.RepoDataRecord]:
    records = await rattler.solve([rattler.Channel(channel.as_uri())], specs, platforms=["linux-64", "noarch"])
    return {r.name.normalized: r for r in records}


async def build(record: rattler.RepoDataRecord, python: rattler.RepoDataRecord, tmp: Path,
                plan: BytecodePlan | str) -> LayerBlob:
    return await build_package_layer(
        record, python_record=python, prefix=PREFIX, platform="linux-64", work_dir=tmp / "work",
        package_cache_dir=tmp / "pkgs", bytecode=bytecode_for(record, plan if isinstance(plan, BytecodePlan) else None),
    )


def members(blob: LayerBlob) -> dict[str, bytes | None]:
    """Archive path (prefix stripped) -> content (None for directories and links)."""
    out: dict[str, bytes | None] = {}
    with tarfile.open(blob.path) as tar:
        for member in tar:
            f = tar.extractfile(member) if member.isfile() else None
            out[member.name.removeprefix(PREFIX.strip("/") + "/")] = f.read() if f else None
    return out


def record_of(layer: dict[str, bytes | None]) -> dict:
    (name,) = [n for n in layer if n.startswith("conda-meta/") and n.endswith(".json")]
    return json.loads(layer[name] or b"")


async def host_plan(records: dict[str, rattler.RepoDataRecord]) -> BytecodePlan:
    plan = await plan_bytecode(records["python"], python_site_packages(records["python"]), HostInterpreters())
    assert isinstance(plan, BytecodePlan), plan
    return plan


async def test_noarch_python_modules_get_deterministic_pycs(channel: Path, tmp_path: Path) -> None:
    records = await solve(channel, ["pure", f"python {MAJOR}.{MINOR}.*"])
    plan = await host_plan(records)
    assert plan.tag == TAG
    blob = await build(records["pure"], records["python"], tmp_path / "one", plan)
    layer = members(blob)

    pyc = layer[f"{SITE}/pure/__pycache__/mod.{TAG}.pyc"]
    assert pyc is not None
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b01  # PEP 552: hash-based, source never checked
    assert pyc[8:16] == importlib.util.source_hash(MOD_SOURCE)
    code = marshal.loads(pyc[16:])
    assert code.co_filename == f"{PREFIX}/{SITE}/pure/mod.py"  # tracebacks show the image's path
    assert f"{SITE}/pure/__pycache__/__init__.{TAG}.pyc" in layer
    assert not any(n.startswith(f"{SITE}/pure/__pycache__/py2only") for n in layer)
    assert not any(n.startswith(f"{SITE}/pure/__pycache__/leak") for n in layer)
    # Nothing of the build machine in any pyc.
    assert not any(str(tmp_path).encode() in (data or b"") for data in layer.values())

    # conda-meta names each pyc as conda records the ones it compiles.
    record = record_of(layer)
    pycs = {p["_path"]: p for p in record["paths_data"]["paths"] if p["path_type"] == "pyc_file"}
    assert set(pycs) == {f"{SITE}/pure/__pycache__/{m}.{TAG}.pyc" for m in ("__init__", "mod")}
    assert set(pycs) <= set(record["files"])
    entry = pycs[f"{SITE}/pure/__pycache__/mod.{TAG}.pyc"]
    assert entry["size_in_bytes"] == len(pyc)

    # Another build into fresh directories, later (mtimes differ): the same bytes.
    time.sleep(1.1)
    again = await build(records["pure"], records["python"], tmp_path / "two", plan)
    assert (again.digest, again.diff_id) == (blob.digest, blob.diff_id)


async def test_packages_built_for_one_python(channel: Path, tmp_path: Path) -> None:
    records = await solve(channel, ["archpy", "nopy", f"python {MAJOR}.{MINOR}.*"])
    plan = await host_plan(records)
    assert wants_bytecode(records["archpy"]) and not wants_bytecode(records["nopy"])
    assert not wants_bytecode(records["python"])
    layer = members(await build(records["archpy"], records["python"], tmp_path / "a", plan))
    # The package's own pyc is kept as shipped; the module without one gets one.
    assert layer[f"{SITE}/archpy/__pycache__/__init__.{TAG}.pyc"] == b"shipped by the package"
    assert layer[f"{SITE}/archpy/__pycache__/other.{TAG}.pyc"] is not None
    assert not any("share/archpy/__pycache__" in n for n in layer)
    pycs = [p["_path"] for p in record_of(layer)["paths_data"]["paths"] if p["path_type"] == "pyc_file"]
    assert pycs == [f"{SITE}/archpy/__pycache__/other.{TAG}.pyc"]

    # A package that does not depend on python is one layer for every python version.
    assert bytecode_for(records["nopy"], plan) is None
    layer = members(await build(records["nopy"], records["python"], tmp_path / "n", plan))
    assert not any("__pycache__" in n for n in layer)


async def test_a_pycache_link_is_not_written_through(channel: Path, tmp_path: Path) -> None:
    outside = Path("/tmp/condery-test-cachelink-target")
    outside.mkdir(exist_ok=True)
    try:
        records = await solve(channel, ["cachelink", f"python {MAJOR}.{MINOR}.*"])
        plan = await host_plan(records)
        with pytest.raises(PackageError, match="cachelink.*__pycache__") as caught:
            await build(records["cachelink"], records["python"], tmp_path, plan)
        assert str(tmp_path) not in str(caught.value)
        assert list(outside.iterdir()) == []
    finally:
        for item in outside.iterdir():
            item.unlink()
        outside.rmdir()


async def test_no_host_interpreter_of_that_version(channel: Path, tmp_path: Path) -> None:
    records = await solve(channel, ["pure", "python 3.4.*"])
    python = records["python"]
    empty = tmp_path / "empty-path"
    empty.mkdir()
    plan = await plan_bytecode(python, python_site_packages(python), HostInterpreters(search_path=str(empty)))
    assert plan == "the build host has no python3.4"
    assert await plan_bytecode(None, None, HostInterpreters()) == "the environment has no python"
    layer = members(await build(records["pure"], python, tmp_path, plan))
    assert "lib/python3.4/site-packages/pure/mod.py" in layer
    assert not any("__pycache__" in n for n in layer)


def test_layer_key_names_the_bytecode(channel: Path) -> None:
    import asyncio

    records = asyncio.run(solve(channel, ["pure", f"python {MAJOR}.{MINOR}.*"]))

    def key(bytecode: str | None) -> str:
        return layer_key(records["pure"], prefix=PREFIX, site_packages=SITE, allow_scripts=False, bytecode=bytecode)

    # Compiled or not, and for which python, are different layers: a replica without the
    # image's python never serves its layer under the key of a compiled one.
    assert len({key(None), key("cpython-311"), key("cpython-312")}) == 3


async def test_compiler_process_gets_no_server_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "server-secret")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = await _run([sys.executable, "-c", "import os, sys; print(sorted(os.environ)); print(sys.stdin.read())"],
                     30, cwd=tmp_path)
    names, stdin = out.splitlines()[:2]
    assert set(eval(names)) <= {"PATH", "LC_ALL", "PYTHONHASHSEED", "LC_CTYPE"}
    assert stdin == ""


async def test_compiler_process_is_killed_on_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(_Failed, match="longer than"):
        await _run([sys.executable, "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); "
                    "time.sleep(60)"], 1.0, cwd=tmp_path)
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int(marker.read_text()), 0)
