"""End to end: environment files become images, through a real `condery serve` process,
`condery env push`, skopeo, umoci and podman.

The fixture channel is named in the files by its directory's name, as a user names a
local channel; python is the fixture python (this interpreter, packaged).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.fixtures.clients import run_in_rootfs, skopeo_copy, umoci_unpack
from tests.fixtures.python_package import python_version
from tests.fixtures.simple_index import SimpleIndex, serve_index, standard_index
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e


def environment_file(channel: str) -> str:
    major_minor = ".".join(python_version().split(".")[:2])
    return f"""\
# a researcher's environment
name: tqdm-work
channels:
  - {channel}
  - nodefaults
dependencies:
  - python={major_minor}
  - tqdm>=4.50
  - xz=5.2
variables:
  TEAM: analysis
"""


def reordered_file(channel: str) -> str:
    major_minor = ".".join(python_version().split(".")[:2])
    return f"""\
variables: {{TEAM: analysis}}   # same meaning, other spelling
dependencies: ["xz 5.2.*", "tqdm >=4.50", "python {major_minor}.*"]
channels: [{channel}]
name: tqdm-work
"""


def post(registry: Registry, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{registry.url}/api/v1/environments", data=body, method="POST",
                                     headers={"Content-Type": "application/yaml"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def manifest_digest(registry: Registry, name: str) -> str:
    status, headers, body = registry.get(f"/v2/{name}/manifests/latest")
    assert status == 200, body[:400]
    return headers["Docker-Content-Digest"]


def read_back(registry: Registry, name: str, file: str) -> bytes:
    status, _, body = registry.get(f"/api/v1/images/{name}/latest/{file}")
    assert status == 200, body[:400]
    return body


@pytest.fixture(scope="module")
def environments(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("environments")


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Iterator[SimpleIndex]:
    """A loopback simple index of real wheels (the wheelhouse's, pip's among them, and demo ones)."""
    with serve_index(standard_index(tmp_path_factory.mktemp("demo-wheels"))) as served:
        yield served


@pytest.fixture(scope="module")
def registry(tmp_path_factory, fixture_channel, base_layout, environments, index):
    tmp = tmp_path_factory.mktemp("condery-env")
    with condery(tmp, [str(fixture_channel)], f"oci:{base_layout}:bookworm",
                 environments_dir=str(environments), pypi_index=index.url) as running_registry:
        yield running_registry


def test_push_pull_and_run(registry: Registry, fixture_channel: Path, tmp_path: Path) -> None:
    status, answer = post(registry, environment_file(fixture_channel.name).encode())
    assert status == 201, answer
    name = answer["name"]
    assert name == f"env/{answer['id']}" and answer["pull"] == f"{registry.host}/{name}:latest"

    layout = tmp_path / "oci"
    skopeo_copy(f"docker://{answer['pull']}", layout, "latest")
    rootfs = umoci_unpack(layout, "latest", tmp_path / "bundle")
    result = run_in_rootfs(rootfs, ["/opt/conda/bin/python", "-c", "import tqdm; print('tqdm', tqdm.__version__)"])
    assert result.returncode == 0 and "tqdm 4.54.1" in result.stdout, result.stderr
    assert (rootfs / "opt/conda/conda-meta/state").exists()
    # The image holds itself as files: the same packages the API reads back.
    in_image = yaml.safe_load((rootfs / "opt/conda/conda-meta/conda-lock.yml").read_text())
    served = yaml.safe_load(read_back(registry, name, "conda-lock.yml"))
    assert in_image["package"] == served["package"]
    pinned = yaml.safe_load((rootfs / "opt/conda/conda-meta/environment.yml").read_text())
    assert pinned["variables"] == {"TEAM": "analysis"} and pinned["name"] == "tqdm-work"
    assert json.loads((rootfs / "opt/conda/conda-meta/state").read_text())["env_vars"] == {"TEAM": "analysis"}
    config = json.loads(next(p for p in (layout / "blobs/sha256").iterdir() if b'"rootfs"' in p.read_bytes()[:100000]
                             and b'"config"' in p.read_bytes()).read_text())
    assert "TEAM=analysis" in config["config"]["Env"]
    assert config["config"]["Labels"]["org.condery.environment.id"] == answer["id"]

    # The same file spelt otherwise is the same name and the same image.
    again, second = post(registry, reordered_file(fixture_channel.name).encode())
    assert again == 201 and second["id"] == answer["id"]


def test_podman_sees_the_variable(registry: Registry, fixture_channel: Path, podman) -> None:
    _, answer = post(registry, environment_file(fixture_channel.name).encode())
    podman.pull(answer["pull"])
    result = podman.run(answer["pull"], ["sh", "-c", "echo team=$TEAM; python -c 'import tqdm'"])
    assert "team=analysis" in result.stdout


def test_cli_push_prints_the_name(registry: Registry, fixture_channel: Path, tmp_path: Path) -> None:
    path = tmp_path / "environment.yml"
    path.write_text(environment_file(fixture_channel.name))
    # As the README documents it.
    pushed = subprocess.run([sys.executable, "-m", "condery", "env", "push", str(path), "--server", registry.url],
                            capture_output=True, text=True, timeout=120)
    assert pushed.returncode == 0, pushed.stderr
    _, answer = post(registry, path.read_bytes())
    assert pushed.stdout.strip() == answer["name"]
    path.write_text("dependencies: [python\n")
    broken = subprocess.run([sys.executable, "-m", "condery", "env", "push", str(path), "--server", registry.url],
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1 and "line 2" in broken.stderr and "Traceback" not in broken.stderr


def test_locks_are_frozen_and_read_back_locks_name_the_same_image(registry: Registry, fixture_channel: Path) -> None:
    _, answer = post(registry, environment_file(fixture_channel.name).encode())
    conda_lock = read_back(registry, answer["name"], "conda-lock.yml")
    explicit = read_back(registry, answer["name"], "explicit.txt")
    environment_yml = yaml.safe_load(read_back(registry, answer["name"], "environment.yml"))
    assert environment_yml["variables"] == {"TEAM": "analysis"}
    assert any(d.startswith("tqdm=4.54.1=") for d in environment_yml["dependencies"])

    status, locked = post(registry, conda_lock)
    assert status == 201, locked
    status, from_explicit = post(registry, explicit)
    assert status == 201 and from_explicit["id"] == locked["id"]  # one lock, whatever its format
    digest = manifest_digest(registry, locked["name"])
    # The lock of a lock's image is that lock again: the same name, the same image.
    status, again = post(registry, read_back(registry, locked["name"], "conda-lock.yml"))
    assert status == 201 and again["name"] == locked["name"]
    assert manifest_digest(registry, again["name"]) == digest
    # The packages are the solved ones: their layers are shared with the file's image.
    source = json.loads(registry.get(f"/v2/{answer['name']}/manifests/latest")[2])
    frozen = json.loads(registry.get(f"/v2/{locked['name']}/manifests/latest")[2])
    assert {layer["digest"] for layer in source["layers"][:-1]} == {layer["digest"] for layer in frozen["layers"][:-1]}


def test_environments_folder_follows_its_files(registry: Registry, environments: Path, fixture_channel: Path) -> None:
    team = environments / "team-a.yml"
    team.write_text(environment_file(fixture_channel.name))
    (environments / "team-b").mkdir()
    (environments / "team-b" / "environment.yml").write_text("dependencies:\n  - python\n  - 'numpy >>> 1'\n")
    listing = json.loads(registry.get("/api/v1/environments")[2])["environments"]
    by_name = {entry["name"]: entry for entry in listing}
    assert by_name["envs/team-a"]["id"] and "error" not in by_name["envs/team-a"]
    assert "line 3" in by_name["envs/team-b"]["error"] and "not a conda spec" in by_name["envs/team-b"]["error"]
    first = manifest_digest(registry, "envs/team-a")

    status, code, message = registry.error_code("/v2/envs/team-b/manifests/latest")
    assert (status, code) == (400, "NAME_INVALID") and "line 3" in message

    team.write_text(environment_file(fixture_channel.name).replace("xz=5.2", "zlib"))  # no restart
    changed = manifest_digest(registry, "envs/team-a")
    assert changed != first
    listing = json.loads(registry.get("/api/v1/environments")[2])["environments"]
    assert {e["name"]: e for e in listing}["envs/team-a"]["id"] != by_name["envs/team-a"]["id"]

    team.unlink()
    status, code, _ = registry.error_code("/v2/envs/team-a/manifests/latest")
    assert (status, code) == (404, "NAME_UNKNOWN")


def test_hostile_files_are_clear_errors_and_store_nothing(registry: Registry, fixture_channel: Path) -> None:
    records = registry.store / "records" / "environments"
    before = set(records.iterdir()) if records.exists() else set()
    for body, words in [
        (b"dependencies: [python]\n" + b"#" * (10 << 20), "larger than"),
        (b"a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nc: [*b, *b]\n", "aliases"),
        (b"[" * 100_000, "nested deeper"),
        (b"channels: [bioconda]\ndependencies: [python]\n", "'bioconda' is not served"),
        (b"dependencies: [python, {pip: ['--extra-index-url https://x.example/simple']}]\n", "--extra-index-url"),
        (b"name: x\nbuild: 1\ndependencies: [python]\n", "unknown key 'build'"),
    ]:
        status, answer = post(registry, body)
        assert status == 400, (words, answer)
        error = answer["errors"][0]
        assert error["code"] == "MANIFEST_INVALID" and words in error["message"], error
    assert (set(records.iterdir()) if records.exists() else set()) == before
    status, code, _ = registry.error_code("/v2/env/" + "0" * 32 + "/manifests/latest")
    assert (status, code) == (404, "NAME_UNKNOWN")


def pip_file(channel: str) -> str:
    major_minor = ".".join(python_version().split(".")[:2])
    return f"""\
name: with-pip
channels: [{channel}]
dependencies:
  - python={major_minor}
  - tqdm
  - pip:
      - pip
      - condery-demo>=2
      - PyYAML
      - tqdm>=4          # conda's tqdm satisfies it: not installed again
variables:
  DEMO_MODE: strict
"""


def test_pip_packages_install_as_pip_would(registry: Registry, fixture_channel: Path, index: SimpleIndex,
                                           tmp_path: Path, podman) -> None:
    status, answer = post(registry, pip_file(fixture_channel.name).encode())
    assert status == 201, answer
    layout = tmp_path / "oci"
    skopeo_copy(f"docker://{answer['pull']}", layout, "latest")
    rootfs = umoci_unpack(layout, "latest", tmp_path / "bundle")
    python = "/opt/conda/bin/python"
    checks = [
        ([python, "-c", "import condery_demo, yaml, idna, importlib.metadata as m; "
                        "print(condery_demo.VERSION, m.version('pyyaml'), m.version('idna'))"], "2.0 6.0.4"),
        ([python, "-m", "pip", "list", "--disable-pip-version-check"], "condery-demo"),
        ([python, "-m", "pip", "check", "--disable-pip-version-check"], "No broken requirements found"),
        (["/opt/conda/bin/condery-demo"], "demo 2.0"),  # the entry point, with the image's python
        (["/opt/conda/bin/demo-script"], "2.0"),  # a wheel's .data/scripts
    ]
    for argv, expected in checks:
        result = run_in_rootfs(rootfs, argv)
        assert result.returncode == 0 and expected in result.stdout, (argv, result.stdout, result.stderr)
    site = next((rootfs / "opt/conda/lib").glob("python3.*/site-packages"))
    assert (site / "condery_demo-2.0.dist-info/INSTALLER").read_text().strip() == "condery"
    assert not list(site.glob("tqdm-4.70*.dist-info"))  # conda's tqdm stays the only one
    assert list((site / "condery_demo").glob("__pycache__/*.pyc"))  # bytecode, as for conda packages

    manifest = json.loads(registry.get(f"/v2/{answer['name']}/manifests/latest")[2])
    wheel_layers = [layer for layer in manifest["layers"]
                    if layer.get("annotations", {}).get("org.condery.packages", "").endswith(".whl")]
    assert len(wheel_layers) == 4  # pip, condery-demo, pyyaml and idna: one layer each

    lock = yaml.safe_load(read_back(registry, answer["name"], "conda-lock.yml"))
    pinned = {p["name"]: p for p in lock["package"] if p["manager"] == "pip"}
    assert set(pinned) == {"pip", "condery-demo", "pyyaml", "idna"} and all(p["hash"]["sha256"] for p in pinned.values())
    status, locked = post(registry, yaml.safe_dump(lock).encode())
    assert status == 201, locked
    frozen = json.loads(registry.get(f"/v2/{locked['name']}/manifests/latest")[2])
    assert {layer["digest"] for layer in wheel_layers} <= {layer["digest"] for layer in frozen["layers"]}

    podman.pull(answer["pull"])
    result = podman.run(answer["pull"], ["sh", "-c", "echo mode=$DEMO_MODE; condery-demo"])
    assert "mode=strict" in result.stdout and "demo 2.0" in result.stdout


@pytest.mark.parametrize(("requirement", "status", "code", "words"), [
    ("onlysdist", 404, "MANIFEST_UNKNOWN", "onlysdist"),
    ("tqdm<4", 404, "MANIFEST_UNKNOWN", "tqdm"),  # conda's tqdm 4.54.1 is installed: a conflict
    ("no-such-project-anywhere", 404, "MANIFEST_UNKNOWN", "no-such-project-anywhere"),
])
def test_pip_refusals_name_the_package(registry: Registry, fixture_channel: Path, requirement: str, status: int,
                                       code: str, words: str) -> None:
    body = pip_file(fixture_channel.name).replace("      - PyYAML\n", f"      - {requirement}\n")
    pushed, answer = post(registry, body.encode())
    assert pushed == 201, answer
    got, got_code, message = registry.error_code(f"/v2/{answer['name']}/manifests/latest")
    assert (got, got_code) == (status, code), message
    assert words in message and "Traceback" not in message and index_path_hidden(message)


def index_path_hidden(message: str) -> bool:
    return "/tmp/" not in message and "condery-work" not in message


def test_prebuild_an_environment_through_the_builds_api(registry: Registry, fixture_channel: Path) -> None:
    text = environment_file(fixture_channel.name).replace("xz=5.2", "tzdata")
    _, answer = post(registry, text.encode())
    request = urllib.request.Request(f"{registry.url}/api/v1/builds", method="POST",
                                     data=json.dumps({"name": answer["name"]}).encode())
    with urllib.request.urlopen(request, timeout=60) as started:
        assert started.status == 202
        location = started.headers["Location"]
    deadline = time.monotonic() + 120
    while True:
        status = json.loads(registry.get(location)[2])
        if status["state"] in ("done", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status["state"] == "done", status
    assert manifest_digest(registry, answer["name"]) == status["digest"]
    page = json.loads(registry.get(f"/api/v1/images/{answer['name']}/latest")[2])
    assert page["digest"] == status["digest"] and page["name"] == answer["name"]
