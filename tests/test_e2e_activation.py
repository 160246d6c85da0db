"""Activation everywhere, end to end: fixture packages whose activate.d scripts export
variables as conda-forge's do (tests/fixtures/channel.py write_activation_packages),
pulled from a real `condery serve` and run as users run them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fixtures.clients import bundle_env, bundle_process, run_in_rootfs, runc_run
from tests.test_e2e import Registry, condery, unpack

pytestmark = pytest.mark.e2e

DATA = "CONDERY_ACTIVATE_DATA=/opt/conda/share/condery-activate"
STATIC = "condery-activate/condery-activate-full"
DYNAMIC = "bash/condery-activate/condery-activate-dynamic"
HOSTILE = "condery-activate/condery-hostile-activate"
TOOL = "CONDERY_ACTIVATE_TOOL=from-the-tool"  # DYNAMIC's script: only a shell or the entrypoint sets it
# The image's bash is GNU bash (Debian's, repackaged: tests/fixtures/bash_package.py), so
# each mode reads what a real bash reads: `-c` BASH_ENV, `-u -c` BASH_ENV with nounset on
# (DYNAMIC's script tests a variable that may be unset), `-l -c` /etc/profile (the glibc
# test base has none) and BASH_ENV, `-i` only ~/.bashrc (none either).
BASH_MODES = {"bash -c": ["bash", "-c", "env"], "bash -u": ["bash", "-u", "-c", "env"],
              "bash -i": ["bash", "-i", "-c", "env"], "bash -l": ["bash", "-l", "-c", "env"]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, fixture_channel, base_layout):
    tmp = tmp_path_factory.mktemp("condery-activation")
    with condery(tmp, [str(fixture_channel)], f"oci:{base_layout}:bookworm") as running_registry:
        yield running_registry


def config_of(registry: Registry, name: str) -> dict:
    accept = ("application/vnd.oci.image.manifest.v1+json",)
    status, _, body = registry.get(f"/v2/{name}/manifests/latest", accept=accept)
    assert status == 200, body
    status, _, config = registry.get(f"/v2/{name}/blobs/{json.loads(body)['config']['digest']}")
    assert status == 200
    return json.loads(config)["config"]


def test_static_variables_are_in_the_config_for_every_process(registry: Registry, tmp_path: Path) -> None:
    config = config_of(registry, STATIC)
    assert DATA in config["Env"] and "CONDERY_ACTIVATE_FULL=yes" in config["Env"]  # the file of another package
    assert "CONDERY_ACTIVATE_BUILT_FOR=/opt/conda/share" in config["Env"]  # its placeholder replaced
    assert "Entrypoint" not in config  # every script was evaluated: nothing to run at start
    rootfs = unpack(registry, STATIC, tmp_path)
    report = json.loads((rootfs / "opt/conda/etc/condery/activation.json").read_text())
    assert report["method"] == "bwrap" and report["scripts"] == [{"name": "condery-activate.sh", "static": True}]
    env = bundle_env(rootfs.parent)
    for argv in (["/usr/bin/env"],  # exec form
                 ["/bin/sh", "-c", "env"],  # dash, non-interactive: reads no ENV
                 ["/bin/busybox", "sh", "-c", "env"],
                 ["/bin/sh", "-lc", "env"]):
        result = run_in_rootfs(rootfs, argv, env=env)
        assert result.returncode == 0 and DATA in result.stdout.splitlines(), (argv, result)


def test_podman_exec_form_sh_c_and_exec_into_a_running_container(registry: Registry, podman) -> None:
    ref = f"{registry.host}/{STATIC}"
    podman.pull(ref)
    for argv in (["env"], ["sh", "-c", "env"], ["busybox", "sh", "-c", "env"]):
        assert DATA in podman.run(ref, argv, check=True).stdout.splitlines(), argv
    name = f"condery-activation-{int(time.time())}"
    podman.podman("run", "-d", "--name", name, ref, "sleep", "300")
    try:
        for argv in (["env"], ["sh", "-c", "env"]):
            assert DATA in podman.podman("exec", name, *argv).stdout.splitlines(), argv
    finally:
        podman.podman("rm", "-f", "-t", "0", name, check=False)


def test_a_script_that_cannot_be_evaluated_runs_in_the_entrypoint(registry: Registry, podman) -> None:
    config = config_of(registry, DYNAMIC)
    assert config["Entrypoint"] == ["/bin/sh", "/opt/conda/etc/condery/entrypoint.sh"]
    assert config["Cmd"] == ["/bin/sh"]  # the base's Cmd, kept: the entrypoint runs it
    assert DATA in config["Env"] and not any(e.startswith("CONDERY_ACTIVATE_TOOL=") for e in config["Env"])
    ref = f"{registry.host}/{DYNAMIC}"
    podman.pull(ref)
    out = podman.run(ref, ["env"], check=True).stdout.splitlines()
    assert "CONDERY_ACTIVATE_TOOL=from-the-tool" in out and DATA in out
    # exec: the command is PID 1, its exit status is the container's.
    assert podman.run(ref, ["sh", "-c", "echo $$; exit 7"]).stdout.strip() == "1"
    assert podman.run(ref, ["sh", "-c", "exit 7"]).returncode == 7
    # podman exec reaches no entrypoint: the static variables only.
    name = f"condery-activation-dyn-{int(time.time())}"
    podman.podman("run", "-d", "--name", name, ref, "sleep", "300")
    try:
        out = podman.podman("exec", name, "env").stdout.splitlines()
        assert DATA in out and not any(line.startswith("CONDERY_ACTIVATE_TOOL=") for line in out)
    finally:
        podman.podman("rm", "-f", "-t", "0", name, check=False)


def test_exec_form_in_an_unpacked_bundle_goes_through_the_entrypoint(registry: Registry, tmp_path: Path) -> None:
    rootfs = unpack(registry, DYNAMIC, tmp_path)
    process = bundle_process(rootfs.parent)
    assert process["args"][:2] == ["/bin/sh", "/opt/conda/etc/condery/entrypoint.sh"]
    result = run_in_rootfs(rootfs, [*process["args"][:2], "env"], env=bundle_env(rootfs.parent))
    assert result.returncode == 0 and "CONDERY_ACTIVATE_TOOL=from-the-tool" in result.stdout.splitlines(), result


def test_hostile_scripts_are_reported_leak_nothing_and_do_not_hang_the_build(registry: Registry,
                                                                            tmp_path: Path) -> None:
    started = time.monotonic()
    config = config_of(registry, HOSTILE)
    assert time.monotonic() - started < 120
    assert DATA in config["Env"]
    assert not any(e.startswith("CONDERY_HOSTILE") for e in config["Env"]), config["Env"]
    rootfs = unpack(registry, HOSTILE, tmp_path)
    report = json.loads((rootfs / "opt/conda/etc/condery/activation.json").read_text())
    reasons = {s["name"]: s.get("reason") for s in report["scripts"]}
    assert "/etc/shadow" in reasons["00-condery-hostile-shadow.sh"]
    assert reasons["01-condery-hostile-net.sh"] and "did not end" in reasons["02-condery-hostile-loop.sh"]
    assert "depends on the container" in reasons["03-condery-hostile-host.sh"]
    assert reasons["condery-activate.sh"] is None
    log = (registry.store.parent / "condery.log").read_text()
    assert "activation scripts are evaluated in a bubblewrap sandbox" in log


def test_containerd_runc_and_a_dockerfile_run_see_the_variables(registry: Registry, tmp_path: Path, podman) -> None:
    """What Kubernetes runs (containerd), the bare OCI runtime (runc on umoci's bundle), and a
    Dockerfile `RUN` in an image built FROM a condery name: each process sees the variable."""
    import shutil
    import subprocess

    from tests.fixtures.containerd import containerd

    ref = f"{registry.host}/{STATIC}:latest"
    with containerd() as daemon:
        daemon.pull(ref)
        ran = daemon.run(ref, ["sh", "-c", "env"])
        assert ran.returncode == 0 and DATA in ran.stdout.splitlines(), ran.stderr

    if shutil.which("runc"):
        rootfs = unpack(registry, STATIC, tmp_path)
        bundle = rootfs.parent
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["args"] = ["/usr/bin/env"]
        config["root"]["readonly"] = True
        (bundle / "config.json").write_text(json.dumps(config))
        ran = subprocess.run(["runc", "--root", str(tmp_path / "runc-state"), "run", "-b", str(bundle),
                              f"condery-act-{int(time.time())}"], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0 and DATA in ran.stdout.splitlines(), ran.stderr

    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {ref}\nRUN echo \"seen: $CONDERY_ACTIVATE_DATA\" && "
                                        "sh -c 'test -n \"$CONDERY_ACTIVATE_DATA\"'\n")
    podman.allow_insecure(registry.host)
    built = podman.podman("build", "--tls-verify=false", "-t", "localhost/act-run", str(context), check=False,
                          timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert "seen: /opt/conda/share/condery-activate" in built.stdout


def test_real_bash_under_podman_run_and_exec(registry: Registry, podman) -> None:
    """`podman run`: the entrypoint activates and every bash inherits it. `podman exec`: no
    entrypoint; `bash -c`, `bash -u -c` and `bash -l -c` source the scripts through
    BASH_ENV, an interactive bash (which reads only ~/.bashrc) has the config's static
    variables."""
    ref = f"{registry.host}/{DYNAMIC}"
    podman.pull(ref)
    version = podman.run(ref, ["bash", "-c", 'echo "$BASH $BASH_VERSION"'], check=True).stdout.strip()
    assert version.startswith("/opt/conda/bin/bash 5."), version
    for mode, argv in BASH_MODES.items():
        out = podman.run(ref, argv, check=True).stdout.splitlines()
        assert DATA in out and TOOL in out, (mode, out)
    name = f"condery-activation-bash-{int(time.time())}"
    podman.podman("run", "-d", "--name", name, ref, "sleep", "300")
    try:
        for mode, argv in BASH_MODES.items():
            out = podman.podman("exec", name, *argv).stdout.splitlines()
            assert DATA in out, (mode, out)
            assert (TOOL in out) is (mode != "bash -i"), (mode, out)
        # What docs/activation.md tells an interactive shell to do for the rest.
        out = podman.podman("exec", name, "bash", "-i", "-c", ". /opt/conda/etc/condery/activate.sh; env").stdout
        assert TOOL in out.splitlines()
        # Sourced once per process tree: a nested bash inherits, it does not run the scripts again.
        nested = podman.podman("exec", name, "bash", "-c",
                               "export CONDERY_ACTIVATE_TOOL=mine; bash -c 'echo $CONDERY_ACTIVATE_TOOL'").stdout
        assert nested.strip() == "mine", nested
    finally:
        podman.podman("rm", "-f", "-t", "0", name, check=False)


def test_real_bash_under_containerd_and_runc(registry: Registry, tmp_path: Path) -> None:
    """`ctr run IMG ID CMD...` replaces the whole process, entrypoint included (a Kubernetes
    pod's `args:` keep it), and runc runs bash as the bundle's process: without the
    entrypoint, `bash -c` and `bash -l -c` activate through BASH_ENV alone, an interactive
    bash has the config's static variables. With the entrypoint every mode inherits it."""
    from tests.fixtures.containerd import containerd

    ref = f"{registry.host}/{DYNAMIC}:latest"
    with containerd() as daemon:
        daemon.pull(ref)
        for mode, argv in BASH_MODES.items():
            ran = daemon.run(ref, argv)
            assert ran.returncode == 0 and DATA in ran.stdout.splitlines(), (mode, ran.stderr)
            assert (TOOL in ran.stdout.splitlines()) is (mode != "bash -i"), (mode, ran.stdout)

    rootfs = unpack(registry, DYNAMIC, tmp_path)
    entrypoint = bundle_process(rootfs.parent)["args"][:2]
    for mode, argv in BASH_MODES.items():
        ran = runc_run(rootfs.parent, argv, tmp_path / "runc")
        assert ran.returncode == 0 and DATA in ran.stdout.splitlines(), (mode, ran.stderr)
        assert (TOOL in ran.stdout.splitlines()) is (mode != "bash -i"), (mode, ran.stdout)
        ran = runc_run(rootfs.parent, [*entrypoint, *argv], tmp_path / "runc")
        assert ran.returncode == 0 and TOOL in ran.stdout.splitlines(), (mode, ran.stderr)
