"""pip requirements -> pinned wheels -> layers (condery/layers/pip_resolve.py, wheels.py),
against a real index on loopback (tests/fixtures/simple_index.py) and the real uv."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

from condery.layers.bytecode import BytecodePlan, HostInterpreters
from condery.layers.compression import GZIP, open_decompressed
from condery.layers.members import PackageLimits
from condery.layers.wheels import (
    PinnedWheel,
    PipError,
    PipTarget,
    PipUnavailable,
    build_wheel_layer,
    fetch_wheel,
    resolve_wheels,
)
from tests.fixtures.procs import free_port
from tests.fixtures.simple_index import SimpleIndex, serve_index, standard_index, wheelhouse, write_wheel

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
SITE = f"lib/python{PY}/site-packages"
TARGET = PipTarget(python=PY, subdir="linux-64", glibc="2.36", prefix="/opt/conda", site_packages=SITE)
LIMITS = PackageLimits(64 << 20, 10_000)

pytestmark = pytest.mark.skipif(not any(wheelhouse().glob("tqdm-*.whl")),
                                reason="the wheelhouse .ci/install builds is missing")


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory):
    with serve_index(standard_index(tmp_path_factory.mktemp("demo-wheels"))) as served:
        yield served


@pytest.fixture(scope="module")
def html_index(tmp_path_factory: pytest.TempPathFactory):
    idx = standard_index(tmp_path_factory.mktemp("demo-wheels-html"))
    idx.json = False
    with serve_index(idx) as served:
        yield served


async def resolve(index: SimpleIndex, reqs, tmp_path: Path, provided=None, target=TARGET):
    return await resolve_wheels(reqs, target, provided or {}, index.url, timeout=120, work_dir=tmp_path)


async def test_resolves_pins_with_hashes(index: SimpleIndex, tmp_path: Path) -> None:
    pins = await resolve(index, ["tqdm", "yarl>=1.9"], tmp_path)
    by_name = {p.name: p for p in pins}
    assert {"tqdm", "yarl", "multidict", "idna", "propcache"} <= set(by_name)
    for pin in pins:
        path = next(wheelhouse().glob(pin.filename))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == pin.sha256
        assert pin.url == f"{index.url.removesuffix('/simple/')}/files/{pin.filename}"
    assert "cp311" in by_name["yarl"].filename or sys.version_info[:2] != (3, 11)
    assert list(tmp_path.iterdir()) == []  # the scratch directory is gone


async def test_html_index_works_too(html_index: SimpleIndex, tmp_path: Path) -> None:
    pins = await resolve(html_index, ["tqdm"], tmp_path)
    assert [p.name for p in pins] == ["tqdm"]


async def test_conda_provided_requirement_is_dropped(index: SimpleIndex, tmp_path: Path) -> None:
    index.requests.clear()
    pins = await resolve(index, ["condery-demo", "idna"], tmp_path, provided={"idna": "3.21"})
    assert [(p.name, p.version) for p in pins] == [("condery-demo", "2.0")]
    assert not [r for r in index.requests if r.startswith("/files/idna")]  # never downloaded


async def test_conflict_with_conda_names_the_reason(index: SimpleIndex, tmp_path: Path) -> None:
    with pytest.raises(PipError) as err:
        await resolve(index, ["condery-demo"], tmp_path, provided={"idna": "2.10"})
    assert not isinstance(err.value, PipUnavailable)
    message = str(err.value)
    assert "idna" in message and "installed by conda" in message, message
    assert str(tmp_path) not in message
    with pytest.raises(PipError, match="idna"):
        await resolve(index, ["idna<3"], tmp_path, provided={"idna": "3.21"})


async def test_sdist_only_is_refused_by_name(index: SimpleIndex, tmp_path: Path) -> None:
    with pytest.raises(PipError, match="onlysdist") as err:
        await resolve(index, ["onlysdist"], tmp_path)
    assert not isinstance(err.value, PipUnavailable)


async def test_unreachable_index_is_unavailable(tmp_path: Path) -> None:
    dead = SimpleIndex(url=f"http://127.0.0.1:{free_port()}/simple/")
    with pytest.raises(PipUnavailable):
        await resolve(dead, ["tqdm"], tmp_path)


async def test_exclude_newer_picks_the_older_upload(index: SimpleIndex, tmp_path: Path) -> None:
    snapshot = PipTarget(**{**TARGET.__dict__, "exclude_newer": datetime(2022, 1, 1, tzinfo=timezone.utc)})
    pins = await resolve(index, ["condery-demo"], tmp_path, provided={"idna": "3.21"}, target=snapshot)
    assert [(p.name, p.version) for p in pins] == [("condery-demo", "1.0")]
    # conda's packages are not hidden by the snapshot, the index's are:
    with pytest.raises(PipError, match="tqdm"):
        await resolve(index, ["tqdm"], tmp_path, target=snapshot)


@pytest.mark.parametrize("req", ["-r /etc/passwd", "tqdm @ https://example.invalid/tqdm.whl", "tqdm\n-e .", "tqdm[="])
async def test_bad_requirements_are_refused(index: SimpleIndex, tmp_path: Path, req: str) -> None:
    with pytest.raises(PipError):
        await resolve(index, [req], tmp_path)


async def test_fetch_verifies_and_caches(index: SimpleIndex, tmp_path: Path) -> None:
    (pin,) = await resolve(index, ["tqdm"], tmp_path / "work")
    path = await fetch_wheel(pin, tmp_path / "cache", max_bytes=LIMITS.max_unpacked_bytes)
    assert path == tmp_path / "cache" / "wheels" / pin.sha256 / pin.filename
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pin.sha256
    index.requests.clear()
    assert await fetch_wheel(pin, tmp_path / "cache", max_bytes=LIMITS.max_unpacked_bytes) == path
    assert index.requests == []  # from the cache

    wrong = PinnedWheel(pin.name, pin.version, pin.filename, pin.url, "0" * 64)
    with pytest.raises(PipError, match="sha256 mismatch"):
        await fetch_wheel(wrong, tmp_path / "cache2", max_bytes=LIMITS.max_unpacked_bytes)
    assert [p for p in (tmp_path / "cache2").rglob("*") if p.is_file()] == []
    with pytest.raises(PipError, match="larger than"):
        await fetch_wheel(pin, tmp_path / "cache3", max_bytes=100)
    assert [p for p in (tmp_path / "cache3").rglob("*") if p.is_file()] == []


async def _plan() -> BytecodePlan:
    interpreter = await HostInterpreters().find(*sys.version_info[:2])
    assert interpreter is not None
    return BytecodePlan(interpreter, f"lib/python{PY}")


def _members(layer: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = {}
    with open(layer, "rb") as handle, open_decompressed(handle) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            data = tar.extractfile(member).read() if member.isreg() else None
            out[member.name] = (member, data)
    return out


async def _layer(index: SimpleIndex, tmp_path: Path, reqs, provided=None, bytecode=True) -> dict[str, Path]:
    pins = await resolve(index, reqs, tmp_path / "work", provided=provided)
    plan = await _plan() if bytecode else None
    layers = {}
    for pin in pins:
        path = await fetch_wheel(pin, tmp_path / "cache", max_bytes=LIMITS.max_unpacked_bytes)
        out = tmp_path / f"{pin.name}.tar.gz"
        blob = await build_wheel_layer(path, pin, TARGET, out, compression=GZIP, bytecode=plan, limits=LIMITS)
        assert blob.path == out
        layers[pin.name] = out
    return layers


async def test_layer_is_installed_as_pip_would(index: SimpleIndex, tmp_path: Path) -> None:
    layers = await _layer(index, tmp_path, ["condery-demo"], provided={"idna": "3.21"})
    members = _members(layers["condery-demo"])
    site = f"opt/conda/{SITE}"
    dist_info = f"{site}/condery_demo-2.0.dist-info"
    assert members[f"{dist_info}/INSTALLER"][1] == b"condery\n"
    # Entry point and .data/scripts, with the image's python:
    script = members["opt/conda/bin/condery-demo"]
    assert script[1].startswith(b"#!/opt/conda/bin/python\n") and script[0].mode & 0o111
    assert members["opt/conda/bin/demo-script"][1].startswith(b"#!/opt/conda/bin/python\n")
    assert f"opt/conda/include/python{PY}/condery-demo/demo.h" in members
    assert "opt/conda/share/condery-demo/notes.txt" in members
    tag = sys.implementation.cache_tag
    pyc = f"{site}/condery_demo/__pycache__/__init__.{tag}.pyc"
    assert pyc in members
    # RECORD lists every file of the layer, each with its hash and size (RECORD itself without).
    rows = list(csv.reader(io.StringIO(members[f"{dist_info}/RECORD"][1].decode())))
    listed = {os.path.normpath(f"{site}/{row[0]}"): row for row in rows}
    files = {name for name, (info, _) in members.items() if info.isreg()}
    assert files == set(listed)
    for name, row in listed.items():
        if name.endswith("/RECORD"):
            assert row[1:] == ["", ""]
            continue
        data = members[name][1]
        assert row[1] == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert row[2] == str(len(data))


async def test_layer_is_reproducible(index: SimpleIndex, tmp_path: Path) -> None:
    first = await _layer(index, tmp_path / "a", ["tqdm"])
    second = await _layer(index, tmp_path / "b", ["tqdm"])
    digest = [hashlib.sha256(layers["tqdm"].read_bytes()).hexdigest() for layers in (first, second)]
    assert digest[0] == digest[1]


def _hostile(tmp_path: Path, members: dict[str, bytes], symlink: str | None = None) -> tuple[Path, PinnedWheel]:
    path = write_wheel(tmp_path, "evil", "1.0", {"evil/__init__.py": ""}, extra_members=members)
    if symlink:
        with zipfile.ZipFile(path, "a") as zf:
            info = zipfile.ZipInfo(symlink, (2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, PinnedWheel("evil", "1.0", path.name, path.as_uri(), sha)


@pytest.mark.parametrize("members,symlink", [
    ({"../escape.py": b"x"}, None),
    ({"/abs.py": b"x"}, None),
    ({"evil-1.0.data/data/../../../../etc/x": b"x"}, None),
    ({"evil-1.0.data/elsewhere/x": b"x"}, None),
    ({"evil/bad\nname.py": b"x"}, None),
    ({}, "evil/link"),
    ({"evil/unrecorded.py": b"x"}, None),  # not in RECORD
])
async def test_hostile_wheels_are_refused(tmp_path: Path, members, symlink) -> None:
    path, pin = _hostile(tmp_path, members, symlink)
    with pytest.raises(PipError, match="evil-1.0"):
        await build_wheel_layer(path, pin, TARGET, tmp_path / "out.tar.gz", compression=GZIP,
                                bytecode=None, limits=LIMITS)
    assert not (tmp_path / "out.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".stage")] == []


async def test_unpacked_size_is_bounded(tmp_path: Path) -> None:
    path = write_wheel(tmp_path, "big", "1.0", {"big/data.bin": b"\0" * 4096})
    pin = PinnedWheel("big", "1.0", path.name, path.as_uri(), hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(PipError, match="more than"):
        await build_wheel_layer(path, pin, TARGET, tmp_path / "o.tar.gz", compression=GZIP, bytecode=None,
                                limits=PackageLimits(1000, 100))


async def test_installed_layers_work_for_python_and_pip(index: SimpleIndex, tmp_path: Path) -> None:
    """Unpack the layers into one root and ask a real python and pip what they see."""
    layers = await _layer(index, tmp_path, ["condery-demo", "tqdm"], provided={"idna": "3.21"})
    root = tmp_path / "root"
    root.mkdir()
    for layer in layers.values():
        with open(layer, "rb") as handle, open_decompressed(handle) as stream:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(root, filter="tar")
    site = root / "opt/conda" / SITE
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    code = ("import importlib.metadata as m, condery_demo, tqdm, pathlib;"
            "print(m.version('condery-demo'), m.version('tqdm'), condery_demo.VERSION);"
            "missing = [str(f) for d in ('condery-demo', 'tqdm') for f in m.files(d) if not f.locate().exists()];"
            "assert not missing, missing")
    out = subprocess.run([sys.executable, "-s", "-c", code], check=False, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    demo_version, tqdm_version, module_version = out.stdout.split()
    assert (demo_version, module_version) == ("2.0", "2.0")
    assert f"tqdm-{tqdm_version}-" in next(wheelhouse().glob("tqdm-*.whl")).name
    listing = subprocess.run([sys.executable, "-m", "pip", "list", "--path", str(site), "--format", "freeze",
                              "--disable-pip-version-check"], check=False, env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert "condery-demo==2.0" in listing.stdout.split() and any(
        line.startswith("tqdm==") for line in listing.stdout.split())


async def test_provided_by_conda_maps_python_packages(tmp_path: Path) -> None:
    import rattler

    from condery.layers.wheels import provided_by_conda
    from tests.fixtures.condapkg import index_channel, write_conda_package

    write_conda_package(tmp_path, "python", "3.11.7", "h0")
    write_conda_package(tmp_path, "pyyaml", "6.0.1", "py311h0", depends=["python >=3.11,<3.12.0a0"])
    write_conda_package(tmp_path, "typing_extensions", "4.9.0", "pyh0", noarch="python", depends=["python"])
    write_conda_package(tmp_path, "zlib", "1.3", "h0")
    index_channel(tmp_path)
    records = await rattler.solve([rattler.Channel(tmp_path.as_uri())], ["pyyaml", "typing_extensions", "zlib"],
                                  platforms=["linux-64", "noarch"])
    assert provided_by_conda(records) == {"pyyaml": "6.0.1", "typing-extensions": "4.9.0"}


async def test_index_credentials_ride_on_its_own_files_only(index: SimpleIndex, tmp_path: Path) -> None:
    secret_index = index.url.replace("http://", "http://user:s3cret@")
    pins = await resolve_wheels(["tqdm"], TARGET, {}, secret_index, timeout=120, work_dir=tmp_path)
    assert pins[0].url.startswith("http://user:s3cret@127.0.0.1:")
    with pytest.raises(PipError) as err:
        await resolve_wheels(["onlysdist"], TARGET, {}, secret_index, timeout=120, work_dir=tmp_path)
    assert "s3cret" not in str(err.value)


def test_wheel_layer_key_covers_its_inputs() -> None:
    from condery.layers.compression import ZSTD
    from condery.records.keys import wheel_layer_key

    pin = PinnedWheel("tqdm", "4.70.1", "tqdm-4.70.1-py3-none-any.whl", "http://u:p@x/tqdm.whl", "a" * 64)

    def key(target=TARGET, bytecode="cpython-311", compression=GZIP, wheel=pin) -> str:
        return wheel_layer_key(wheel, target, bytecode=bytecode, compression=compression)

    assert key().startswith(f"wheel/v1/{'a' * 64}/") and key() == key()
    assert key(wheel=PinnedWheel(*[*pin.__dict__.values()][:3], "http://mirror/tqdm.whl", "a" * 64)) == key()
    others = {key(bytecode=None), key(compression=ZSTD),
              key(target=PipTarget(**{**TARGET.__dict__, "prefix": "/opt/other"})),
              key(target=PipTarget(**{**TARGET.__dict__, "python": "3.12", "site_packages": "lib/python3.12/site-packages"})),
              key(wheel=PinnedWheel(pin.name, pin.version, pin.filename, pin.url, "b" * 64))}
    assert key() not in others and len(others) == 5


async def test_members_with_permission_bits_but_no_file_type_are_regular_files(index: SimpleIndex,
                                                                                 tmp_path: Path) -> None:
    """hatchling writes `0o644` without S_IFREG (attrs' wheels): a file, not a refusal;
    a symlink's type (above) is still refused."""
    wheel = next(wheelhouse().glob("attrs-*.whl"), None)
    if wheel is None:
        pytest.skip("no attrs wheel in the wheelhouse (.ci/install builds it)")
    with zipfile.ZipFile(wheel) as zf:
        assert any(stat.S_IFMT(i.external_attr >> 16) == 0 for i in zf.infolist())  # the case at hand
    pin = PinnedWheel("attrs", wheel.name.split("-")[1], wheel.name, wheel.as_uri(),
                      hashlib.sha256(wheel.read_bytes()).hexdigest())
    blob = await build_wheel_layer(wheel, pin, TARGET, tmp_path / "attrs.tar.gz", compression=GZIP,
                                   bytecode=None, limits=LIMITS)
    assert blob.size > 0
