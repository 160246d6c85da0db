"""End to end: python modules of a pulled image load from the pycs condery compiled into
its layers, and a container writes nothing on import, as root or as uid 1000."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.fixtures.clients import bundle_env, run_chrooted
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.test_e2e import OCI_MANIFEST, condery, unpack

pytestmark = pytest.mark.e2e

TAG = sys.implementation.cache_tag
SITE = f"/opt/conda/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
IMPORT = ("import sys, tqdm, condery_noarch; "
          "print(sys.modules['tqdm'].__cached__); print(condery_noarch.main.__code__.co_filename)")


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path below `root` with its size and mtime: what a write would change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def site_packages_writes(verbose_stderr: str) -> list[str]:
    """`python -v` lines where the import system wrote, or tried to write, a pyc there."""
    return [line for line in verbose_stderr.splitlines()
            if SITE in line and ("could not create" in line or line.startswith("# created"))]


def test_imports_load_pycs_and_write_nothing(tmp_path: Path, fixture_channel: Path, base_layout: Path) -> None:
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm") as registry:
        rootfs = unpack(registry, "python/tqdm/condery-noarch", tmp_path)
    env = bundle_env(rootfs.parent)
    # The fixture python ships its stdlib without pycs (conda-built pythons ship them, and
    # condery compiles no python package's own), so only site-packages is watched.
    site_packages = Path(f"{rootfs}{SITE}")
    assert (site_packages / f"tqdm/__pycache__/__init__.{TAG}.pyc").is_file()
    before = tree(site_packages)
    argv = ["/opt/conda/bin/python", "-v", "-c", IMPORT]

    # uid 1000, as a JupyterHub user: the root-owned environment is read-only to it.
    as_user = run_chrooted(rootfs, argv, user="1000:1000", env=env)
    assert as_user.returncode == 0, as_user.stderr[-3000:]
    cached, co_filename = as_user.stdout.split()
    assert cached == f"{SITE}/tqdm/__pycache__/__init__.{TAG}.pyc"
    assert co_filename == f"{SITE}/condery_noarch/__init__.py"  # a traceback's path is the image's
    assert f"# code object from '{cached}'" in as_user.stderr
    assert f"# code object from '{SITE}/condery_noarch/__pycache__/__init__.{TAG}.pyc'" in as_user.stderr
    assert site_packages_writes(as_user.stderr) == []

    # root, who could write: the pycs are valid, so it does not.
    as_root = run_chrooted(rootfs, argv, env=env)
    assert as_root.returncode == 0, as_root.stderr[-3000:]
    assert site_packages_writes(as_root.stderr) == []
    assert tree(site_packages) == before

    # `conda list` and uninstallers see the pycs in the package's record.
    records = list((rootfs / "opt/conda/conda-meta").glob("tqdm-*.json"))
    assert f"tqdm/__pycache__/__init__.{TAG}.pyc" in records[0].read_text()


def test_no_interpreter_for_the_image_python_is_logged_once(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    for module in ("one", "two"):
        write_conda_package(channel, f"condery-{module}", "1.0", "pyh_0", noarch="python", depends=["python"],
                            files=[PkgFile(f"site-packages/{module}.py", b"X = 1\n")])
    write_conda_package(channel, "python", "3.4.0", "h0_metadata_only", license="metadata-only stand-in")
    index_channel(channel)
    with condery(tmp_path, [str(channel)], "scratch") as registry:
        status, _, body = registry.get("/v2/condery-one/condery-two/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200, body
    log = (tmp_path / "condery.log").read_text()
    lines = [line for line in log.splitlines() if "python bytecode not compiled" in line]
    assert len(lines) == 1, lines
    assert "the build host has no python3.4" in lines[0] and str(tmp_path) not in lines[0]
