"""End to end: one image, several environments as Jupyter kernels (build/kernels.py).

A meta-package `lab` (jupyter_client and ipykernel: the server's side) lists `kernels:`
from the environments folder: team A on the running interpreter's python (3.11), team B
on the fixture's other python (3.9), each with condery-activate, whose activate.d script
exports a path under its environment. The image holds each team's environment at
/opt/conda/envs/<name>, registered as a kernel of the image's own environment; in a runc
container on umoci's bundle, `jupyter kernelspec list --json` lists both, and
jupyter_client starts each kernel, runs code in it, and the code sees its own sys.prefix,
python version, environment file variable and activate.d variable. ipykernel,
jupyter_client and their closure are wheels repackaged as conda packages (offline): the
test venv's for 3.11, the ones `.ci/install` downloads for 3.9 (wheel_packages.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.clients import bundle_env, run_in_rootfs, runc_run, skopeo_copy, umoci_unpack
from tests.fixtures.python_package import OTHER_PYTHON_SHORT, other_interpreter, python_version
from tests.fixtures.wheel_packages import build_kernel_channel
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

PYTHON = ".".join(python_version().split(".")[:2])
TEAM_A = f"name: Team A\ndependencies: [python={PYTHON}, tqdm, condery-activate-full]\nvariables: {{TEAM: a}}\n"
# sqlite: IPython 8 imports sqlite3, and the fixture python's _sqlite3 links libsqlite3,
# which the glibc test base lacks (conda's python depends on sqlite; the fixture's on nothing).
TEAM_B = f"dependencies: [python={OTHER_PYTHON_SHORT}, xz, sqlite, condery-activate]\nvariables: {{TEAM: b}}\n"
TOOLS = "name: tools only\ndependencies: [xz]\n"  # no python: no kernel

# Run in the container by the image's python: the kernelspecs as `jupyter kernelspec list
# --json` gives them, then each kernel started by jupyter_client over ipc (runc leaves the
# container's loopback down; a server on a pod uses tcp, the kernel's code is the same).
START_KERNELS = """
import json, os, subprocess, sys
os.environ.update(HOME="/tmp", JUPYTER_RUNTIME_DIR="/tmp/rt", IPYTHONDIR="/tmp/ipy")
os.makedirs("/tmp/rt", exist_ok=True)
listed = subprocess.run(["jupyter", "kernelspec", "list", "--json"], capture_output=True, text=True)
out = {"listed": json.loads(listed.stdout) if listed.returncode == 0 else listed.stderr}
from jupyter_client.manager import KernelManager
for name in ("team-a", "team-b"):
    km = KernelManager(kernel_name=name, transport="ipc", ip=f"/tmp/rt/{name}")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=120)
    msg_id = kc.execute("import os, platform, sys; print(sys.prefix, platform.python_version(), "
                        "os.environ.get('TEAM'), os.environ.get('CONDERY_ACTIVATE_DATA'), "
                        "os.environ.get('CONDERY_ACTIVATE_FULL'))")
    texts, seen = [], []
    while True:
        msg = kc.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg["msg_type"])
        if msg["msg_type"] == "stream":
            texts.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            texts.append("ERROR " + " ".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    out[name] = "".join(texts).strip()
    out[name + "-messages"] = seen
    kc.stop_channels()
    km.shutdown_kernel(now=True)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def registry(tmp_path_factory, base_layout) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("kernels")
    channel = build_kernel_channel(tmp / "channel")
    folder = tmp / "environments"
    folder.mkdir()
    (folder / "team-a.yml").write_text(TEAM_A)
    (folder / "team-b").mkdir()
    (folder / "team-b" / "environment.yml").write_text(TEAM_B)
    (folder / "tools.yaml").write_text(TOOLS)
    lab = {"specs": [f"python={PYTHON}", "jupyter-client", "ipykernel"], "kernels": "all"}
    # Three environments of ~35 packages each: a budget that leaves every package its layer
    # (grouping has tests of its own), so that kernel layers are shared by package.
    with condery(tmp, [str(channel)], f"oci:{base_layout}:bookworm", environments_dir=str(folder),
                 meta_packages={"lab": lab}, layer_budget=125) as running:
        yield running


def test_kernels_are_listed_by_the_images_api(registry: Registry) -> None:
    status, _, body = registry.get("/api/v1/images/lab/latest")
    assert status == 200, body[:500]
    kernels = {k["name"]: k for k in json.loads(body)["kernels"]}
    assert set(kernels) == {"team-a", "team-b", "tools"}
    assert kernels["team-a"]["display_name"] == "Team A" and kernels["team-a"]["language"] == "python"
    assert kernels["team-b"]["prefix"] == "/opt/conda/envs/team-b"
    assert kernels["tools"]["language"] is None and kernels["tools"]["kernel"] is False


def test_each_kernel_runs_in_its_own_environment(registry: Registry, tmp_path: Path) -> None:
    # skopeo + umoci + runc rather than podman: podman's vfs storage here copies the whole
    # tree for each of the image's ~100 layers (CLIENTS.md), minutes for one pull.
    layout = tmp_path / "oci"
    skopeo_copy(f"docker://{registry.host}/lab:latest", layout, "latest")
    bundle = tmp_path / "bundle"
    rootfs = umoci_unpack(layout, "latest", bundle)
    env = bundle_env(bundle)
    assert not any(key.startswith("CONDERY_ACTIVATE") for key in env)  # the kernels' own, not the image's
    result = runc_run(bundle, ["/opt/conda/bin/python", "-c", START_KERNELS], tmp_path / "runc", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    specs = out["listed"]["kernelspecs"]
    assert {"team-a", "team-b"} <= set(specs) and "tools" not in specs, out["listed"]
    assert specs["team-a"]["spec"]["display_name"] == "Team A"
    assert specs["team-b"]["spec"]["display_name"] == "team-b"
    assert specs["team-b"]["resource_dir"] == "/opt/conda/share/jupyter/kernels/team-b"
    data = "/opt/conda/envs/{}/share/condery-activate"
    assert out["team-a"] == f"/opt/conda/envs/team-a {python_version()} a {data.format('team-a')} yes", out
    assert out["team-b"] == f"/opt/conda/envs/team-b {other_interpreter().version} b {data.format('team-b')} no", out
    # Each environment has its own packages: tqdm only in team-a's; the tools environment
    # is there without a kernel.
    checks = run_in_rootfs(rootfs, ["sh", "-c", "/opt/conda/envs/team-a/bin/python -c 'import tqdm' && "
                                                "! /opt/conda/envs/team-b/bin/python -c 'import tqdm' 2>/dev/null && "
                                                "/opt/conda/envs/tools/bin/xz --version"], env=env)
    assert checks.returncode == 0, checks.stderr[-2000:]
    history = (rootfs / "opt/conda/envs/team-a/conda-meta/history").read_text()
    assert "ipykernel" in history  # added to the kernel's environment: the file did not list it
    assert list((rootfs / "opt/conda/envs/team-b/lib/python3.9/site-packages").glob("zmq/backend/cython/*.so"))
    assert not (rootfs / "opt/conda/envs/team-a/etc/profile.d").exists()  # the system's files are the image's


def test_kernel_layers_are_shared_between_images_that_place_them_alike(registry: Registry) -> None:
    """Two meta-package names holding the same kernels share those kernels' layers."""
    manifests = [json.loads(registry.get(f"/v2/{name}/manifests/latest")[2]) for name in ("lab", "lab/zlib")]
    layers = [{layer["digest"] for layer in m["layers"]} for m in manifests]
    shared = layers[0] & layers[1]
    assert len(shared) >= len(layers[0]) - 2  # all but the image's own environment layer (and zlib's)
