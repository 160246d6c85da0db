"""End to end: an environment its user changes in a running container (build/changeable.py).

A real `condery serve` over the fixture channel served on loopback HTTP (so that the
image's .condarc names a channel a container reaches), and a loopback pip index. The
default `jupyter` image (changeable) and `fixed` (the same, with conda and pip, but root's)
are pulled with skopeo, unpacked by umoci as root (owners kept) and run by runc as the
image's user, uid 1000, with the host's network (the channel and the index are on loopback).

The package manager is the real conda 4.9.2 from Anaconda's 2020 packages in the fixtures
(on python 3.9), and pip 20.3.1 with it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.base_image import BASE_TAG
from tests.fixtures.clients import oci_validate, skopeo_copy, umoci_unpack
from tests.fixtures.http_channel import FaultyChannel, faulty_channel
from tests.fixtures.simple_index import SimpleIndex, serve_index, write_wheel
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

JOVYAN = {"name": "jovyan", "uid": 1000, "gid": 100, "group": "users", "home": "/home/jovyan"}
FIXED = {"specs": ["jupyterlab", "jupyterhub-singleuser", "conda", "pip"], "user": JOVYAN,
         "workdir": "/home/jovyan", "changeable": False}
# A changeable image with a second environment at /opt/conda/envs/tools (a tools-only
# environment of the folder: no python, so no kernel and no ipykernel to add).
HUB = {"specs": ["jupyterlab", "jupyterhub-singleuser"], "user": JOVYAN, "changeable": True, "kernels": ["tools"]}


@pytest.fixture(scope="module")
def channel(fixture_channel: Path) -> Iterator[FaultyChannel]:
    with faulty_channel(fixture_channel) as served:
        yield served


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleIndex]:
    wheels = tmp_path_factory.mktemp("wheels")
    served = SimpleIndex()
    served.add(write_wheel(wheels, "condery-pip-demo", "1.0", {"condery_pip_demo/__init__.py": "WHERE = __file__\n"}))
    with serve_index(served) as running:
        yield running


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base_layout, channel: FaultyChannel, index: SimpleIndex) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("changeable")
    (tmp / "environments").mkdir()
    (tmp / "environments" / "tools.yml").write_text("dependencies: [xz]\n")
    with condery(tmp, [channel.url], f"oci:{base_layout}:{BASE_TAG}", pypi_index=index.url,
                 meta_packages={"fixed": FIXED, "hub": HUB}, environments_dir=str(tmp / "environments")) as running:
        yield running


def _bundle(registry: Registry, name: str, tmp: Path) -> Path:
    layout = skopeo_copy(f"docker://{registry.host}/{name}:latest", tmp / "oci", "latest")
    oci_validate(layout)
    umoci_unpack(layout, "latest", tmp / "bundle")
    return tmp / "bundle"


def _run(bundle: Path, script: str, runc_root: Path) -> subprocess.CompletedProcess[str]:
    """`script` under runc as the image's user, with the host's network (loopback)."""
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = ["/bin/sh", "-c", script]
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    (bundle / "config.json").write_text(json.dumps(config))
    return subprocess.run(["runc", "--root", str(runc_root), "run", "-b", str(bundle), f"c{os.getpid()}"],
                          capture_output=True, text=True, timeout=600, check=False)


INSTALL = (
    "set -x; id -u; "
    "conda install --yes --quiet condery-noarch; echo conda-exit=$?; "
    "python -c 'import condery_noarch, sys; print(\"conda-import\", condery_noarch.__file__)'; "
    "pip install --no-cache-dir condery-pip-demo; echo pip-exit=$?; "
    "python -c 'import condery_pip_demo; print(\"pip-import\", condery_pip_demo.WHERE)'; "
    "python --version; conda list --json | python -c 'import json,sys; "
    "print(\"listed\", sorted(p[\"name\"] for p in json.load(sys.stdin) if p[\"name\"].startswith(\"condery\")))'"
)


def test_the_user_installs_with_conda_and_pip(registry: Registry, channel: FaultyChannel, index: SimpleIndex,
                                              tmp_path: Path) -> None:
    bundle = _bundle(registry, "jupyter", tmp_path)
    rootfs = bundle / "rootfs"
    prefix = rootfs / "opt/conda"
    # The prefix, its package files and the environment layer's files are jovyan's; /opt is not.
    for path in (prefix, prefix / "bin/python3.9", prefix / "conda-meta", prefix / "lib/python3.9/site-packages",
                 prefix / "conda-meta/history", prefix / ".condarc"):
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (1000, 100), path
    assert (rootfs / "opt").stat().st_uid == 0
    condarc = (prefix / ".condarc").read_text()
    assert f"  - {channel.url.rstrip('/')}" in condarc, condarc
    assert "python 3.9.*" in (prefix / "conda-meta/pinned").read_text()
    assert index.url in (prefix / "pip.conf").read_text()

    result = _run(bundle, INSTALL, tmp_path / "runc")
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr)
    assert out.splitlines()[0] == "1000", out
    assert "conda-exit=0" in out and "pip-exit=0" in out, (out, result.stderr)
    assert "conda-import /opt/conda/lib/python3.9/site-packages/condery_noarch" in out, out
    assert "pip-import /opt/conda/lib/python3.9/site-packages/condery_pip_demo/__init__.py" in out, out
    assert "Python 3.9." in out, out  # the pin kept the environment's python
    assert "listed ['condery-noarch', 'condery-pip-demo']" in out, out  # conda sees pip's too
    assert any("condery-pip-demo" in path for path in index.requests), index.requests  # pip.conf's index


def test_a_root_owned_environment_refuses_with_condas_message(registry: Registry, tmp_path: Path) -> None:
    bundle = _bundle(registry, "fixed", tmp_path)
    prefix = bundle / "rootfs/opt/conda"
    assert prefix.stat().st_uid == 0 and not (prefix / ".condarc").exists()
    result = _run(bundle, "conda install --yes condery-noarch; echo conda-exit=$?; "
                          "pip install --no-cache-dir condery-pip-demo; echo pip-exit=$?", tmp_path / "runc")
    text = result.stdout + result.stderr
    # conda's NotWritableError (its package cache under the prefix) or EnvironmentNotWritableError.
    assert "NotWritableError" in text and "The current user does not have write permissions" in text, text
    assert "conda-exit=1" in text, text
    # pip's own answer to a site-packages it cannot write: the user's site instead (~/.local).
    assert "Defaulting to user installation because normal site-packages is not writeable" in text, text


def test_the_images_api_says_who_owns_the_environment(registry: Registry) -> None:
    status, _, body = registry.get("/api/v1/images/jupyter/latest")
    assert status == 200, body
    assert json.loads(body)["changeable"] == {"prefix": "/opt/conda", "owner": "1000:100",
                                              "package_managers": ["conda", "pip"]}
    status, _, body = registry.get("/api/v1/images/fixed/latest")
    assert status == 200 and json.loads(body)["changeable"] is None, body
    # The image page says it too.
    status, _, page = registry.get("/images/jupyter/latest")
    assert status == 200 and b'id="changeable"' in page and b"<code>1000:100</code>" in page, page[:2000]
    status, _, page = registry.get("/images/fixed/latest")
    assert status == 200 and b'id="changeable"' not in page


def test_layers_of_one_owner_are_shared_and_not_roots(registry: Registry) -> None:
    """The changeable image's package layers are other layers than root's, keyed by owner:
    `jupyter/xz` reuses every layer `jupyter` built."""
    status, _, _ = registry.get("/v2/jupyter/manifests/latest")
    assert status == 200
    before = registry.layer_keys()
    status, _, body = registry.get("/v2/jupyter/xz/manifests/latest")
    assert status == 200, body
    built = registry.layer_keys() - before
    assert len(built) == 1, built  # xz's layer only, jovyan's


def test_the_user_changes_a_second_environment_too(registry: Registry, tmp_path: Path) -> None:
    """`conda install -n tools` as jovyan: the environments under envs/ are the user's as well."""
    bundle = _bundle(registry, "hub", tmp_path)
    tools = bundle / "rootfs/opt/conda/envs/tools"
    assert (tools.stat().st_uid, (tools / "conda-meta").stat().st_uid) == (1000, 1000)
    assert (tools / "conda-meta/pinned").read_text() == ""  # no python to keep, nothing the name pinned
    result = _run(bundle, "conda install --yes --quiet -n tools zlib && conda list -n tools --json", tmp_path / "runc")
    assert result.returncode == 0, (result.stdout, result.stderr)
    listed = json.loads(result.stdout[result.stdout.index("["):])
    assert {"xz", "zlib"} <= {p["name"] for p in listed}, listed
