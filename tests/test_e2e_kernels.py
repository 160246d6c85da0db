"""End to end: one image, several environments as Jupyter kernels (build/kernels.py).

A meta-package `lab` (jupyter_client and ipykernel: the server's side) lists `kernels:`
from the environments folder. The image holds each team's environment at
/opt/conda/envs/<name>, registered as a kernel of the image's own environment; in a
podman container, jupyter_client starts each kernel, runs code in it, and the code sees
its own sys.prefix and its environment file's variable. ipykernel, jupyter_client and
their closure are the test venv's wheels repackaged as conda packages (offline).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.clients import bundle_process, run_in_rootfs, skopeo_copy, umoci_unpack
from tests.fixtures.python_package import python_version
from tests.fixtures.wheel_packages import build_kernel_channel
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

PYTHON = ".".join(python_version().split(".")[:2])
TEAM_A = f"name: Team A\ndependencies: [python={PYTHON}, tqdm]\nvariables: {{TEAM: a}}\n"
TEAM_B = f"dependencies: [python={PYTHON}, xz]\nvariables: {{TEAM: b}}\n"
TOOLS = "name: tools only\ndependencies: [xz]\n"  # no python: no kernel

START_KERNELS = """
import json, os, sys
os.environ.update(HOME="/tmp", JUPYTER_RUNTIME_DIR="/tmp/rt", IPYTHONDIR="/tmp/ipy")
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import start_new_kernel
specs = KernelSpecManager().get_all_specs()
out = {"specs": {name: spec["spec"] for name, spec in specs.items()}}
for name in ("team-a", "team-b"):
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=120)
    msg_id = kc.execute("import sys, os; print(sys.prefix, os.environ.get('TEAM'))")
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
    # skopeo + umoci + bwrap rather than podman: podman's vfs storage here copies the whole
    # tree for each of the image's ~100 layers (CLIENTS.md), minutes for one pull.
    layout = tmp_path / "oci"
    skopeo_copy(f"docker://{registry.host}/lab:latest", layout, "latest")
    bundle = tmp_path / "bundle"
    rootfs = umoci_unpack(layout, "latest", bundle)
    env = dict(item.split("=", 1) for item in bundle_process(bundle)["env"])
    result = run_in_rootfs(rootfs, ["/opt/conda/bin/python", "-c", START_KERNELS], env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"team-a", "team-b"} <= set(out["specs"]) and "tools" not in out["specs"]
    assert out["specs"]["team-a"]["display_name"] == "Team A"
    assert out["specs"]["team-b"]["display_name"] == "team-b"
    assert out["team-a"] == "/opt/conda/envs/team-a a", out
    assert out["team-b"] == "/opt/conda/envs/team-b b", out
    # Each environment has its own packages: tqdm only in team-a's; the tools environment
    # is there without a kernel.
    checks = run_in_rootfs(rootfs, ["sh", "-c", "/opt/conda/envs/team-a/bin/python -c 'import tqdm' && "
                                                "! /opt/conda/envs/team-b/bin/python -c 'import tqdm' 2>/dev/null && "
                                                "/opt/conda/envs/tools/bin/xz --version"], env=env)
    assert checks.returncode == 0, checks.stderr[-2000:]
    history = (rootfs / "opt/conda/envs/team-a/conda-meta/history").read_text()
    assert "ipykernel" in history  # added to the kernel's environment: the file did not list it
    assert not (rootfs / "opt/conda/envs/team-a/etc/profile.d").exists()  # the system's files are the image's


def test_kernel_layers_are_shared_between_images_that_place_them_alike(registry: Registry) -> None:
    """Two meta-package names holding the same kernels share those kernels' layers."""
    manifests = [json.loads(registry.get(f"/v2/{name}/manifests/latest")[2]) for name in ("lab", "lab/zlib")]
    layers = [{layer["digest"] for layer in m["layers"]} for m in manifests]
    shared = layers[0] & layers[1]
    assert len(shared) >= len(layers[0]) - 2  # all but the image's own environment layer (and zlib's)
