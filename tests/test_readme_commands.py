"""The README's quick start and curl lines, run as written against a real `condery serve`.

Only the address changes (the README writes HOST, 127.0.0.1:8080 or registry:8080) and the
example build id (a build's id is a hash of its image key, so it is read from the POST's
Location). The channel holds small generated packages under the README's names (numpy,
scipy, python), so every line means what it says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.procs import cache_root, free_port, start_process, wait_http
from tests.test_e2e import condery

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"
_ADDRESSES = re.compile(r"http://(HOST|127\.0\.0\.1:8080|registry:8080)")


def readme_section(title: str) -> str:
    """The text of the README's `## title` section."""
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_curl_lines() -> list[str]:
    """The shell lines of the README's sh blocks that call curl, in order (the Environments
    section's have a test of their own)."""
    lines, in_sh = [], False
    text = README.read_text().replace(readme_section("Environments"), "")
    for line in text.splitlines():
        if line.startswith("```"):
            in_sh = line.strip() == "```sh"
        elif in_sh and "curl " in line and not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def block(section: str, kind: str) -> str:
    return re.search(rf"^```{kind}\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/install installs it)")
def test_the_readme_environment_lines_work_as_written(tmp_path: Path) -> None:
    """The Environments section's environment.yml and its command lines, in a directory
    holding that file, against a registry whose channel is named conda-forge (a local
    directory of that name) and whose environments folder holds the file as team-a.yml."""
    section = readme_section("Environments")
    environment = block(section, "yaml")
    lines = [line.split("  #", 1)[0].strip() for line in block(section, "sh").splitlines() if line.strip()]
    assert len(lines) == 5 and lines[0].startswith("condery env push"), lines
    channel = tmp_path / "conda-forge"
    write_conda_package(channel, "python", "3.11.7", "h0_readme", files=[])
    write_conda_package(channel, "numpy", "1.26.4", "h0", files=[PkgFile("lib/numpy.txt", b"numpy")])
    index_channel(channel)
    folder = tmp_path / "environments"
    folder.mkdir()
    (folder / "team-a.yml").write_text(environment)
    work = tmp_path / "work"
    work.mkdir()
    (work / "environment.yml").write_text(environment)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # condery, as installed

    def sh(line: str, base: str) -> str:
        result = subprocess.run(["bash", "-c", _ADDRESSES.sub(base, line)], capture_output=True, text=True,
                                timeout=120, cwd=work, env=env)
        assert result.returncode == 0, (line, result.stderr)
        return result.stdout

    with condery(tmp_path, [str(channel)], "scratch", environments_dir=str(folder)) as registry:
        name = sh(lines[0], registry.url).strip()
        pushed = json.loads(sh(lines[1], registry.url))
        assert name == pushed["name"] == f"env/{pushed['id']}" and pushed["kind"] == "environment.yml"
        listing = json.loads(sh(lines[2], registry.url))["environments"]
        assert [(e["name"], e["id"]) for e in listing] == [("envs/team-a", pushed["id"])]
        sh(lines[3], registry.url)
        assert "manager: conda" in (work / "conda-lock.yml").read_text()
        frozen = json.loads(sh(lines[4], registry.url))
        assert frozen["kind"] == "conda-lock.yml"
        status, headers, _ = registry.get(f"/v2/{frozen['name']}/manifests/latest")
        assert status == 200
        status, _, body = registry.get(f"/v2/{name}/manifests/latest")
        assert status == 200
        config = json.loads(registry.get(f"/v2/{name}/blobs/{json.loads(body)['config']['digest']}")[2])
        assert "OMP_NUM_THREADS=1" in config["config"]["Env"]


def run(line: str, base: str) -> str:
    result = subprocess.run(["bash", "-c", _ADDRESSES.sub(base, line)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (line, result.stderr)
    return result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/install installs it)")
def test_the_readme_curl_lines_work_as_written(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    write_conda_package(channel, "python", "3.11.7", "h0_readme", files=[])
    write_conda_package(channel, "numpy", "1.26.4", "h0", files=[PkgFile("lib/numpy.txt", b"numpy")])
    write_conda_package(channel, "scipy", "1.11.4", "h0", files=[PkgFile("lib/scipy.txt", b"scipy")])
    index_channel(channel)
    lines = readme_curl_lines()
    assert len(lines) == 6, lines  # the images, compose, builds POST and GET lines and the wait loop
    images, compose, post, get, *wait = lines
    with condery(tmp_path, [str(channel)], "scratch") as registry:
        answer = json.loads(run(images, registry.url))
        assert answer["name"] == "numpy/scipy.gt.1.0"
        assert {p["name"] for p in answer["platforms"]["linux-64"]["packages"]} == {"numpy", "scipy"}

        assert json.loads(run(compose, registry.url)) == {"name": "numpy.ge.1.26/scipy.eq.1", "problems": []}

        head = run(post, registry.url)
        assert head.startswith("HTTP/1.1 202"), head
        location = re.search(r"^Location: (\S+)", head, re.MULTILINE).group(1)
        example_id = re.search(r"/api/v1/builds/(\w+)", get).group(1)
        status = json.loads(run(get.replace(example_id, location.rsplit("/", 1)[1]), registry.url))
        assert status["name"] == "numpy/python" and status["state"] in ("queued", "solving", "building", "done")

        run("\n".join(wait), registry.url)  # returns once the build is done or failed
        status = json.loads(run(f"curl -s {registry.url}{location}", ""))
        assert status["state"] == "done" and status["digest"].startswith("sha256:")
        # Again for a name already built: 200 with no Location, and the loop must not wait.
        started = time.monotonic()
        run("\n".join(wait), registry.url)
        assert time.monotonic() - started < 10


# -- the quick start -----------------------------------------------------------------------
DEBIAN_PYTHON = Path("/usr/bin/python3")  # the distribution's own, with its EXTERNALLY-MANAGED marker (PEP 668)


def quick_start_lines() -> list[str]:
    """The two command lines of the README's quick start (comments removed)."""
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.skipif(not DEBIAN_PYTHON.exists() or not list(Path("/usr/lib").glob("python3*/EXTERNALLY-MANAGED"))
                    or shutil.which("git") is None,
                    reason="needs Debian 12's python3 (PEP 668) with python3-venv, and git")
def test_the_quick_start_works_as_written_on_debian(tmp_path: Path) -> None:
    """As a Debian 12 user runs it: Debian's python3 first on PATH, a clean checkout.

    The first line installs (from the wheelhouse .ci/install made: no network) and serves;
    CONDERY_PORT moves it off 8080, which other tests on this machine may hold. The
    second line is checked for what makes it work under PEP 668 (its `python3` is the
    venv's) without running the whole suite inside a test.
    """
    install_and_serve, run_tests = quick_start_lines()
    assert install_and_serve.endswith(".venv/bin/condery serve") and "python3 -m venv .venv" in install_and_serve
    assert run_tests == ". .venv/bin/activate && .ci/install && python3 -m pytest -q"
    checkout = tmp_path / "condery"
    checkout.mkdir()
    root = README.parent
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (root / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, checkout / name)
    wheelhouse = cache_root() / "wheelhouse"
    assert any(wheelhouse.glob("condery-*.whl")), f"no wheelhouse at {wheelhouse}: run .ci/install"
    # Tests reach nothing beyond loopback: pip installs from the wheelhouse .ci/install made.
    env = {"PATH": f"/usr/bin:/bin:{os.environ['PATH']}", "CONDERY_PORT": str(port := free_port()),
           "PYTHONPATH": "", "VIRTUAL_ENV": "", "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}
    # What the README's venv is for: Debian's python3 refuses `pip install .` as root or not.
    refused = subprocess.run(["bash", "-c", "python3 -m pip install --dry-run ."], cwd=checkout,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr

    log = tmp_path / "quick-start.log"
    proc = start_process(["bash", "-c", install_and_serve], cwd=checkout, env=env, log_path=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/v2/", timeout=300, proc=proc, log_path=log)
        assert "condery serving conda-forge" in log.read_text()
        assert (checkout / "condery-data").is_dir()
    finally:
        # bash waits for condery: stop the whole session this test started, by its id.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    python = subprocess.run(["bash", "-c", ". .venv/bin/activate && python3 -c 'import sys; print(sys.prefix)'"],
                            cwd=checkout, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert python.stdout.strip() == str(checkout / ".venv")


# -- the quick start's client lines ---------------------------------------------------------
def client_lines() -> list[str]:
    """The sh block after "Then, from any OCI client:" (comments removed)."""
    section = README.read_text().split("Then, from any OCI client:", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_quick_start_client_lines_work_as_written(tmp_path: Path, base_layout: Path, podman) -> None:
    """skopeo and podman exactly as the README writes them, only the address moved off 8080
    (real numpy and python: the repackaged wheels). There is no Docker engine here: the
    docker line is checked for the one thing that differs (localhost, which Docker trusts)."""
    from tests.fixtures.wheel_packages import build_realistic_channel

    skopeo, podman_run, docker = client_lines()
    assert skopeo.startswith("skopeo copy ") and podman_run.startswith("podman run ")
    assert docker == "docker pull localhost:8080/python/numpy"
    channel = build_realistic_channel(tmp_path / "channel")
    (tmp_path / "server").mkdir()
    with condery(tmp_path / "server", [str(channel)], f"oci:{base_layout}:bookworm") as registry:
        address = registry.url.removeprefix("http://")
        work = tmp_path / "client"
        work.mkdir()
        for line in (skopeo, podman_run):
            result = subprocess.run(["bash", "-c", line.replace("127.0.0.1:8080", address)], cwd=work,
                                    env=podman.env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, (line, result.stderr[-2000:])
    index = json.loads((work / "numpy" / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "latest"
