"""docs/ci.md: its CI files against the schemas GitHub and GitLab publish (as vendored by
check-jsonschema, so offline), its names against condery's grammar, its Dockerfile built
with `podman build` FROM a real condery, and its prebuild recipe run as written.

The e2e parts change only the documented parameters: the registry's address
(`condery.example.org` -> a local `condery serve`) and, in the prebuild loop, the names.
`numpy` is a stand-in here (a noarch python package, license "stand-in", with a
`numpy` module that has only `__version__`), next to the fixture channel's real python.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from condery.image.meta import DEFAULT_META_PACKAGES
from condery.image.names import parse_name
from condery.image.tags import parse_reference
from tests.fixtures.clients import Podman
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.test_e2e import Registry, condery

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ci.md"
HOST = "condery.example.org"
needs_check_jsonschema = pytest.mark.skipif(shutil.which("check-jsonschema") is None,
                                            reason="check-jsonschema is a test extra (pip install -e '.[test]')")


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), re.MULTILINE | re.DOTALL)


def check_jsonschema(schema: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["check-jsonschema", "--builtin-schema", schema, str(path)],
                          capture_output=True, text=True, timeout=120)


@needs_check_jsonschema
def test_the_ci_files_are_valid_for_github_and_gitlab(tmp_path: Path) -> None:
    github, gitlab = blocks("yaml")
    for text, schema in ((github, "vendor.github-workflows"), (gitlab, "vendor.gitlab-ci")):
        path = tmp_path / f"{schema}.yml"
        path.write_text(text)
        result = check_jsonschema(schema, path)
        assert result.returncode == 0, result.stdout + result.stderr
    # The check can fail: a job with its image in the wrong place is refused by both schemas.
    broken = yaml.safe_load(github)
    broken["jobs"]["test"]["container"] = {"name": broken["jobs"]["test"]["container"]["image"]}
    (tmp_path / "broken-github.yml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema("vendor.github-workflows", tmp_path / "broken-github.yml").returncode != 0
    broken = yaml.safe_load(gitlab)
    broken["test"]["container"] = broken["test"].pop("image")
    (tmp_path / "broken-gitlab.yml").write_text(yaml.safe_dump(broken))
    assert check_jsonschema("vendor.gitlab-ci", tmp_path / "broken-gitlab.yml").returncode != 0


def documented_references() -> list[str]:
    """Every image reference docs/ci.md writes: `image:` values, `name:` of an image, FROM."""
    text = DOC.read_text().replace("${{ matrix.python }}", "3.12")  # a matrix value, as GitHub fills it in
    return re.findall(rf"(?:image:|name:|FROM)\s+({re.escape(HOST)}/[^\s`]+)", text)


def test_every_documented_name_is_one_condery_reads() -> None:
    refs = documented_references()
    assert len(refs) >= 6, refs
    for ref in refs:
        name, _, tag = ref.removeprefix(f"{HOST}/").partition(":")
        request = parse_name(name, DEFAULT_META_PACKAGES)
        assert request.specs, ref
        parse_reference(tag or "latest")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, fixture_channel: Path, base_layout: Path):
    tmp = tmp_path_factory.mktemp("ci-docs")
    stand_ins = tmp / "stand-ins"
    write_conda_package(stand_ins, "numpy", "1.26.4", "py_0", noarch="python", license="stand-in",
                        depends=["python"],
                        files=[PkgFile("site-packages/numpy/__init__.py", b'__version__ = "1.26.4"\n')])
    index_channel(stand_ins)
    with condery(tmp, [str(fixture_channel), str(stand_ins)], f"oci:{base_layout}:bookworm") as running_registry:
        yield running_registry


@pytest.mark.e2e
def test_the_dockerfile_builds_from_a_condery_name(registry: Registry, podman: Podman, tmp_path: Path) -> None:
    (dockerfile,) = blocks("dockerfile")
    assert dockerfile.startswith(f"FROM {HOST}/python/numpy\n") and "RUN python -c" in dockerfile
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile.replace(HOST, registry.host))
    (context / "test_app.py").write_text("def test_app():\n    assert True\n")
    podman.allow_insecure(registry.host)
    result = podman.podman("build", "--tls-verify=false", "-t", "localhost/ci-docs-app", str(context),
                           check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1.26.4" in result.stdout  # the RUN step's python imported the image's numpy
    ran = podman.run("localhost/ci-docs-app", ["sh", "-c", "pwd && ls /app && python -c 'import numpy'"])
    assert ran.returncode == 0 and ran.stdout.split() == ["/app", "Dockerfile", "test_app.py"], ran.stderr


@pytest.mark.e2e
def test_the_prebuild_recipe_runs_as_written(registry: Registry) -> None:
    (recipe,) = [b for b in blocks("sh") if "/api/v1/builds" in b]
    assert f"REGISTRY=https://{HOST}" in recipe
    names = re.search(r'^NAMES="[^"]*"$', recipe, re.MULTILINE)
    script = recipe.replace(f"https://{HOST}", registry.url).replace(names.group(0), 'NAMES="python/numpy nump"')

    def run() -> list[str]:
        result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    built, misspelt = run()
    assert built.startswith("python/numpy: ")
    build = json.loads(built.split(": ", 1)[1])
    assert build["state"] == "done" and build["digest"].startswith("sha256:")
    # The pull the workshop makes is answered from the prebuilt image.
    status, headers, _ = registry.get("/v2/python/numpy/manifests/latest", method="HEAD",
                                      accept=("application/vnd.oci.image.manifest.v1+json",))
    assert status == 200 and headers["Docker-Content-Digest"] == build["digest"]
    assert misspelt.startswith("nump: ") and "did you mean numpy?" in misspelt
    # Again: a built name answers done at once, without a build to follow.
    again = run()[0]
    assert json.loads(again.split(": ", 1)[1])["digest"] == build["digest"]
