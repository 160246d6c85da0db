"""End to end: images that JupyterHub, CI jobs and plain `podman run` can use as they are.

A real `condery serve` with the default meta-packages, over the fixture channel (its
`jupyterlab`, `jupyterhub-singleuser`, `bash`, `git`, `curl` are clearly named
stand-ins) and the glibc test base, whose own uid 1000 is `user`. The `jupyter` image
must run as uid 1000 with a home it can write under containerd (a Kubernetes node), plain
runc and podman: the first two create a missing working directory as root and never
chown it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.base_image import BASE_TAG
from tests.fixtures.clients import Podman, bundle_process, oci_validate, skopeo_copy, umoci_unpack
from tests.fixtures.containerd import containerd
from tests.test_e2e import Registry, condery
from condery.oci.manifest import sha256_digest

pytestmark = pytest.mark.e2e

# What a notebook server needs of its home, as one script for every runtime.
HOME_CHECK = (
    'echo "uid=$(id -u) gid=$(id -g) home=$HOME cwd=$(pwd) shell=$SHELL"; '
    'test -d "$HOME" && test -w "$HOME" && echo home-writable; '
    "mkdir -p ~/.local/share/jupyter && echo made-jupyter-dir; "
    "command -v jupyterhub-singleuser; "
    "grep '^jovyan:' /etc/passwd; echo \"base-uid-1000-lines=$(grep -c '^user:' /etc/passwd)\""
)


def assert_home_works(output: str) -> None:
    assert "uid=1000 gid=100 home=/home/jovyan cwd=/home/jovyan shell=/bin/sh" in output, output
    assert "home-writable" in output and "made-jupyter-dir" in output, output
    assert "/opt/conda/bin/jupyterhub-singleuser" in output, output
    assert "jovyan:x:1000:100:jovyan:/home/jovyan:/bin/sh" in output, output
    assert "base-uid-1000-lines=0" in output, output  # the base's `user` (1000) gave way to jovyan


@pytest.fixture(scope="module")
def registry(tmp_path_factory, fixture_channel, base_layout):
    tmp = tmp_path_factory.mktemp("condery-users")
    with condery(tmp, [str(fixture_channel)], f"oci:{base_layout}:{BASE_TAG}") as running_registry:
        yield running_registry


def test_jupyter_under_containerd(registry: Registry) -> None:
    ref = f"{registry.host}/jupyter:latest"
    with containerd() as daemon:
        daemon.pull(ref)
        result = daemon.run(ref, ["/bin/sh", "-c", HOME_CHECK])
        assert result.returncode == 0, result.stderr
        assert_home_works(result.stdout)
        # No command: the image's Cmd, KubeSpawner's default `jupyterhub-singleuser`.
        result = daemon.run(ref)
        assert result.returncode == 0, result.stderr
        assert "jupyterhub-singleuser (condery test stand-in): uid 1000 home /home/jovyan" in result.stdout
    assert not daemon.mounts()
    assert not daemon._own_shims()


def test_jupyter_under_runc(registry: Registry, tmp_path: Path) -> None:
    layout = skopeo_copy(f"docker://{registry.host}/jupyter:latest", tmp_path / "oci", "latest")
    oci_validate(layout)
    bundle = tmp_path / "bundle"
    rootfs = umoci_unpack(layout, "latest", bundle)
    home = (rootfs / "home/jovyan").stat()
    assert (home.st_uid, home.st_gid, home.st_mode & 0o7777) == (1000, 100, 0o755)
    process = bundle_process(bundle)
    assert (process["user"]["uid"], process["user"]["gid"], process["cwd"]) == (1000, 100, "/home/jovyan")
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = ["/bin/sh", "-c", HOME_CHECK]
    (bundle / "config.json").write_text(json.dumps(config))
    result = subprocess.run(["runc", "--root", str(tmp_path / "runc"), "run", "-b", str(bundle), f"t{os.getpid()}"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert_home_works(result.stdout)


def test_jupyter_under_podman(registry: Registry, podman: Podman) -> None:
    ref = f"{registry.host}/jupyter"
    result = podman.run(ref, ["/bin/sh", "-c", HOME_CHECK])
    assert result.returncode == 0, result.stderr
    assert_home_works(result.stdout)


def test_shell_image_runs_a_ci_job(registry: Registry, podman: Podman) -> None:
    ref = f"{registry.host}/shell"
    job = (
        "set -e; git --version; curl --version; "
        "git init /tmp/repo; cd /tmp/repo; echo data > file.txt; "
        "tar czf /tmp/out.tgz file.txt; tar tzf /tmp/out.tgz; find /tmp/repo -name file.txt | sed 's/^/found /'"
    )
    result = podman.run(ref, ["bash", "-c", job])
    assert result.returncode == 0, result.stderr
    for line in ("git version 2.43.0 (condery test stand-in)", "CA bundle: /opt/conda/ssl/cacert.pem",
                 "Initialized empty Git repository", "file.txt", "found /tmp/repo/file.txt"):
        assert line in result.stdout, result.stdout
    # A login shell, as `bash -l` CI runners start, sees the environment.
    result = podman.run(ref, ["bash", "-lc", 'echo "prefix=$CONDA_PREFIX"; command -v git'])
    assert result.returncode == 0, result.stderr
    assert "prefix=/opt/conda" in result.stdout and "/opt/conda/bin/git" in result.stdout, result.stdout


def _without_cmd(layout: Path, tag: str) -> None:
    """Rewrite the layout's `tag` to an image whose config has no Cmd (as many bases)."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    entry = next(e for e in index["manifests"] if e["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads((blobs / entry["digest"].removeprefix("sha256:")).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    del config["config"]["Cmd"]

    def put(document: dict) -> tuple[str, int]:
        data = json.dumps(document).encode()
        (blobs / sha256_digest(data).removeprefix("sha256:")).write_bytes(data)
        return sha256_digest(data), len(data)

    manifest["config"]["digest"], manifest["config"]["size"] = put(config)
    entry["digest"], entry["size"] = put(manifest)
    (layout / "index.json").unlink()  # a new file: the blobs are hard links to the cached layout
    (layout / "index.json").write_text(json.dumps(index))


def test_podman_run_without_a_command(tmp_path: Path, fixture_channel: Path, base_layout: Path, podman: Podman) -> None:
    base = tmp_path / "base"
    shutil.copytree(base_layout, base, copy_function=os.link)
    _without_cmd(base, BASE_TAG)
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base}:{BASE_TAG}") as registry:
        # The environment's bash (a stand-in here) when it has one.
        ref = f"{registry.host}/bash/xz"
        assert podman.inspect_image(podman.pull(ref))["Config"]["Cmd"] == ["/opt/conda/bin/bash"]
        result = podman.run(ref)
        assert result.returncode == 0, result.stderr
        # Else nothing: an engine then says so rather than running something surprising.
        result = podman.run(f"{registry.host}/xz")
        assert result.returncode != 0 and "no command or entrypoint" in result.stderr, result.stderr
