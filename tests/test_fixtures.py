"""The test world itself works: packages install and run, the base image runs, channels solve,
and an image assembled by hand (base + conda packages at /opt/conda) runs its programs.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import rattler
from rattler import BuildString, Channel, GenericVirtualPackage, IndexJson, PackageName, PathsJson, Version
from rattler.platform.subdir import SubdirLiteral

from tests.fixtures.base_image import (
    BASE_PATH,
    BASE_TAG,
    DEBIAN_PACKAGES,
    download_debs,
    make_rootfs,
    resolve_debs,
    write_layout,
)
from tests.fixtures.channel import HELLO_PLACEHOLDER, compile_hello
from tests.fixtures.elf import missing_libraries
from tests.fixtures.clients import (
    Podman,
    bundle_env,
    bundle_process,
    oci_validate,
    run_in_rootfs,
    skopeo_copy,
    skopeo_inspect_raw,
    skopeo_push,
    umoci_unpack,
)
from tests.fixtures.procs import cache_root
from tests.fixtures.python_package import BUILD_PREFIX, python_version
from tests.fixtures.wheel_packages import (
    build_realistic_channel,
    conda_name,
    dependency_closure,
    other_kernel_packages,
    wheel_packages,
)

PLATFORMS: list[SubdirLiteral] = ["linux-64", "noarch"]
VIRTUAL_PACKAGES = [
    GenericVirtualPackage(PackageName("__glibc"), Version("2.36"), BuildString("0")),
    GenericVirtualPackage(PackageName("__unix"), Version("0"), BuildString("0")),
    GenericVirtualPackage(PackageName("__linux"), Version("6.1"), BuildString("0")),
]


# Tests are synchronous on purpose: they run real processes, which would block a loop.
def solve(channel: Path, specs: list[str]) -> list[rattler.RepoDataRecord]:
    return asyncio.run(
        rattler.solve([Channel(channel.as_uri())], specs, platforms=PLATFORMS, virtual_packages=VIRTUAL_PACKAGES)
    )


def install(records: list[rattler.RepoDataRecord], prefix: Path, cache: Path, image_prefix: str | None = None) -> None:
    asyncio.run(
        rattler.install(records, prefix, cache_dir=cache, alternative_target_prefix=image_prefix, show_progress=False)
    )


def hex_of(digest: bytes | None) -> str:
    assert digest is not None
    return digest.hex()


# --- the python package ---


def test_python_package_records_placeholders(python_pkg: Path) -> None:
    paths = {e.relative_path.as_posix(): e for e in PathsJson.from_package_archive(python_pkg).paths}
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    # Run paths are $ORIGIN-relative: no binary needs its bytes rewritten (libpython's
    # version string shares bytes with the host prefix, so rewriting it broke the version).
    assert paths[f"bin/python{ver}"].prefix_placeholder is None
    placeholders = {p: e.prefix_placeholder for p, e in paths.items() if e.prefix_placeholder is not None}
    assert placeholders, "the build prefix is recorded where text names it"
    for placeholder in placeholders.values():
        assert placeholder.placeholder == str(BUILD_PREFIX)
        assert "text" in str(placeholder.file_mode)
    assert any("_sysconfigdata_" in p for p in placeholders)
    site_packages = [p for p in paths if "/site-packages/" in p]
    assert site_packages == [f"lib/python{ver}/site-packages/README.txt"]
    assert not any(f"/python{ver}/test/" in p or "__pycache__" in p or "/idlelib/" in p for p in paths)


def test_python_package_runs_at_its_install_prefix(fixture_channel: Path, short_tmp: Path) -> None:
    records = solve(fixture_channel, ["python"])
    assert [(r.name.normalized, str(r.version)) for r in records] == [("python", python_version())]
    prefix = short_tmp / "env"
    install(records, prefix, short_tmp / "pkgs")
    result = subprocess.run(
        [prefix / "bin" / "python", "-c", "import platform, sys; print(platform.python_version(), sys.prefix)"],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": BASE_PATH},  # nothing of the test interpreter's environment
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{python_version()} {prefix}"


# --- the channels ---


def test_fixture_channel_solves_python_tqdm_xz(fixture_channel: Path) -> None:
    records = {r.name.normalized: r for r in solve(fixture_channel, ["python", "tqdm", "xz"])}
    assert set(records) == {"python", "tqdm", "xz", "libgcc-ng", "_libgcc_mutex"}
    assert records["libgcc-ng"].license == "stand-in"
    assert records["tqdm"].noarch.python


def test_edge_case_packages_install_and_run(fixture_channel: Path, short_tmp: Path) -> None:
    specs = ["condery-hello", "condery-symlinks", "condery-noarch", "condery-empty"]
    records = solve(fixture_channel, specs)
    prefix = short_tmp / "env"
    install(records, prefix, short_tmp / "pkgs")

    hello = subprocess.run([prefix / "bin" / "condery-hello"], capture_output=True, text=True, check=True)
    assert hello.stdout.strip() == str(prefix)
    assert (prefix / "etc/condery-hello/prefix.txt").read_text() == f"prefix={prefix}\n"
    assert HELLO_PLACEHOLDER.encode() not in (prefix / "bin" / "condery-hello").read_bytes()

    share = prefix / "share" / "condery-symlinks"
    assert os.readlink(share / "dangling") == "does-not-exist" and not (share / "dangling").exists()
    assert (share / "same-dir-link").read_text() == "the target\n"
    assert (prefix / "bin" / "condery-symlinks-target").read_text() == "the target\n"

    noarch = subprocess.run([prefix / "bin" / "condery-noarch-hello"], check=False, capture_output=True, text=True)
    assert noarch.returncode == 0, noarch.stderr
    assert noarch.stdout.strip() == "hello from condery-noarch"
    assert json.loads((prefix / "conda-meta" / "condery-empty-1.0-0.json").read_text())["files"] == []


def test_malformed_channel_indexes_but_its_package_is_unusable(malformed_channel: Path, short_tmp: Path) -> None:
    (record,) = solve(malformed_channel, ["ca-certificates"])
    package = malformed_channel / "linux-64" / record.file_name
    assert hex_of(record.sha256) == hashlib.sha256(package.read_bytes()).hexdigest()
    with pytest.raises(Exception, match="(?i)zip|component|archive"):
        install([record], short_tmp / "env", short_tmp / "pkgs")


def test_bad_hash_channel_records_a_wrong_sha256(bad_hash_channel: Path) -> None:
    (record,) = solve(bad_hash_channel, ["condery-badhash"])
    data = (bad_hash_channel / "linux-64" / record.file_name).read_bytes()
    assert hex_of(record.sha256) != hashlib.sha256(data).hexdigest()
    assert hex_of(record.md5) == hashlib.md5(data).hexdigest()  # only the sha256 lies


# --- the base image ---


def test_base_layout_validates_and_runs_sh(base_layout: Path, tmp_path: Path) -> None:
    oci_validate(base_layout)
    rootfs = umoci_unpack(base_layout, BASE_TAG, tmp_path / "bundle")
    process = bundle_process(tmp_path / "bundle")
    assert process["args"] == ["/bin/sh"]
    assert bundle_env(tmp_path / "bundle")["PATH"] == BASE_PATH
    assert stat.S_IMODE((rootfs / "tmp").lstat().st_mode) == 0o1777
    assert os.readlink(rootfs / "lib64") == "usr/lib64"

    result = run_in_rootfs(rootfs, ["/bin/sh", "-c", "echo ok; id user; ls /proc/self/exe >/dev/null"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ok", "uid=1000(user) gid=1000(user) groups=1000(user)"]


def test_base_layout_is_reproducible(base_layout: Path, tmp_path: Path) -> None:
    # The .debs are in the cache already (base_layout downloaded them): no network here.
    debs = download_debs(resolve_debs(DEBIAN_PACKAGES), cache_root() / "debs")
    make_rootfs(debs, tmp_path / "rootfs")
    write_layout(tmp_path / "rootfs", tmp_path / "layout", tag=BASE_TAG, description=", ".join(p.name for p in debs))
    assert (tmp_path / "layout" / "index.json").read_bytes() == (base_layout / "index.json").read_bytes()


def test_clients_pull_the_base_from_the_reference_registry(
    base_layout: Path, tmp_path: Path, podman: Podman, upstream_registry
) -> None:
    location = upstream_registry.host
    ref = f"{location}/debian:{BASE_TAG}"
    skopeo_push(base_layout, BASE_TAG, ref)
    index = json.loads((base_layout / "index.json").read_text())
    raw = skopeo_inspect_raw(ref)
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == index["manifests"][0]["digest"]

    pulled = skopeo_copy(ref, tmp_path / "pulled", "x")
    oci_validate(pulled)
    rootfs = umoci_unpack(pulled, "x", tmp_path / "bundle")
    assert run_in_rootfs(rootfs, ["/bin/sh", "-c", "echo ok"]).stdout == "ok\n"

    podman.pull(ref)
    result = podman.run(ref, ["/bin/sh", "-c", "echo from podman; id -u"], user="1000")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from podman\n1000\n"


# --- the whole image idea, by hand ---


def test_conda_packages_at_opt_conda_run_on_the_base(base_layout: Path, fixture_channel: Path, tmp_path: Path) -> None:
    """What condery automates: the base, plus conda packages installed for /opt/conda.

    Nothing had to be added to the base for these to run: the libgcc-ng stand-in is
    enough because libc6/libgcc-s1 come from Debian, and xz/python carry their own libs.
    """
    rootfs = umoci_unpack(base_layout, BASE_TAG, tmp_path / "bundle")
    records = solve(fixture_channel, ["python", "tqdm", "xz", "condery-hello", "condery-noarch"])
    install(records, rootfs / "opt" / "conda", tmp_path / "pkgs", image_prefix="/opt/conda")
    env = {"PATH": f"/opt/conda/bin:{BASE_PATH}", "HOME": "/root"}

    def run(*argv: str) -> str:
        result = run_in_rootfs(rootfs, list(argv), env=env)
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        return result.stdout.strip()

    assert run("/opt/conda/bin/python", "-c", "import tqdm, sys; print(sys.prefix, tqdm.__version__)") == (
        "/opt/conda 4.54.1"
    )
    assert run("/opt/conda/bin/tqdm", "--version") == "4.54.1"
    assert run("/opt/conda/bin/xz", "--version").startswith("xz (XZ Utils) 5.2.5")
    assert run("condery-hello") == "/opt/conda"
    assert run("condery-noarch-hello") == "hello from condery-noarch"
    assert run("sh", "-c", "echo data | xz | xz -d") == "data"


# --- the realistic packages: PyPI wheels repackaged as conda packages ---


def test_wheel_packages_are_laid_out_as_conda_forge_ships_them() -> None:
    packages = wheel_packages()
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"

    (numpy,) = (packages / "linux-64").glob("numpy-*.conda")
    index = IndexJson.from_package_archive(numpy)
    assert not index.noarch.python and index.subdir == "linux-64"
    assert str(index.version) == importlib.metadata.version("numpy")
    assert index.depends == [f"python >={ver},<{sys.version_info[0]}.{sys.version_info[1] + 1}.0a0"]
    paths = [e.relative_path.as_posix() for e in PathsJson.from_package_archive(numpy).paths]
    assert all(p.startswith(f"lib/python{ver}/site-packages/") for p in paths)
    assert any("/numpy.libs/" in p for p in paths), "the wheel's bundled libraries come along"
    assert any(p.endswith(".dist-info/METADATA") for p in paths)
    assert not any(p.endswith("/INSTALLER") for p in paths)
    tag = sys.implementation.cache_tag
    assert f"lib/python{ver}/site-packages/numpy/__pycache__/__init__.{tag}.pyc" in paths, "conda-build's pyc"

    (dateutil,) = (packages / "noarch").glob("python-dateutil-*.conda")
    index = IndexJson.from_package_archive(dateutil)
    assert index.noarch.python and index.subdir == "noarch"
    assert "six >=1.5" in index.depends and index.depends[0].startswith("python ")
    paths = [e.relative_path.as_posix() for e in PathsJson.from_package_archive(dateutil).paths]
    assert paths and all(p.startswith("site-packages/") for p in paths)
    assert not any("__pycache__" in p for p in paths), "noarch packages ship no bytecode"


def test_realistic_channel_solves_the_wheels_closure(tmp_path: Path) -> None:
    channel = build_realistic_channel(tmp_path / "channel")
    records = {r.name.normalized: r for r in solve(channel, ["python", "numpy", "scipy", "pandas", "matplotlib"])}
    expected = {conda_name(d.metadata["Name"]): d.version for d in dependency_closure()}
    assert {"numpy", "scipy", "pandas", "matplotlib", "pillow", "python-dateutil", "six"} <= set(expected)
    assert {name: str(records[name].version) for name in expected} == expected
    assert str(records["python"].version) == python_version()


def test_missing_libraries_follows_the_loaders_search(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "hello").write_bytes(compile_hello(HELLO_PLACEHOLDER))
    assert missing_libraries(rootfs, "/bin") == {"bin/hello": ["libc.so.6"]}
    system = rootfs / "usr/lib/x86_64-linux-gnu"
    system.mkdir(parents=True)
    (system / "libc.so.6").write_bytes(b"")
    (rootfs / "lib").symlink_to("usr/lib")  # merged /usr, as the glibc base has it
    assert missing_libraries(rootfs, "/bin") == {}


def test_wheels_of_another_python_are_laid_out_for_it() -> None:
    """ipykernel's closure for 3.9 from the wheelhouse .ci/install fills: compiled wheels
    built for 3.9, pure ones noarch with their console scripts as conda entry points."""
    packages = other_kernel_packages()
    (pyzmq,) = (packages / "linux-64").glob("pyzmq-*.conda")
    index = IndexJson.from_package_archive(pyzmq)
    assert index.subdir == "linux-64" and str(index.build).startswith("py39")
    assert index.depends[0] == "python >=3.9,<3.10.0a0"
    paths = [e.relative_path.as_posix() for e in PathsJson.from_package_archive(pyzmq).paths]
    assert all(p.startswith("lib/python3.9/site-packages/") for p in paths)
    assert any(p.endswith(".cpython-39-x86_64-linux-gnu.so") for p in paths)
    (ipython,) = (packages / "noarch").glob("ipython-*.conda")
    # Markers evaluated for 3.9, not for the running python: IPython 8 needs these below 3.11.
    assert {"exceptiongroup", "typing-extensions"} <= {d.split()[0] for d in IndexJson.from_package_archive(ipython).depends}
    (core,) = (packages / "noarch").glob("jupyter-core-*.conda")
    link = json.loads(_info_member(core, "info/link.json"))
    assert "jupyter = jupyter_core.command:main" in link["noarch"]["entry_points"]


def _info_member(package: Path, name: str) -> bytes:
    import io
    import tarfile
    import zipfile

    import zstandard

    with zipfile.ZipFile(package) as archive:
        info = next(n for n in archive.namelist() if n.startswith("info-"))
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive.read(info))).read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(name)
        assert member is not None
        return member.read()
