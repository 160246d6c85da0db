"""Look before you pull: the composer's grammar, `ImageService.look` in-process (solved
once, cached like a pull, never built), and `GET /api/v1/images/<name>/<tag>` through a
real `condery serve` (packages before any build, digest and layers after a pull, the
registry's errors)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from condery.build.service import ImageService
from condery.image.meta import DEFAULT_META_PACKAGES
from condery.config import load_config
from condery.build.look import shown_channels
from condery.build.outcomes import Outcomes
from condery.oci import errors
from condery.image.compose import compose
from condery.image.names import parse_name
from condery.image.tags import Latest
from condery.build.state import AppState
from tests.test_build import counting_builds, counting_solves
from tests.test_e2e import OCI_MANIFEST, Registry, condery


# -- the composer --------------------------------------------------------------------
@pytest.mark.parametrize(
    "typed, name",
    [
        ("numpy>=1.26", "numpy.ge.1.26"),
        ("scipy 1.*", "scipy.eq.1"),
        ("python=3.11", "python.eq.3.11"),
        ("numpy >=1.20, <2", "numpy.ge.1.20.lt.2"),
        ("scipy>1.0\nnumpy\n\nnumpy", "numpy/scipy.gt.1.0"),  # sorted, de-duplicated
        ("jupyter\nxz", "jupyter/xz"),  # a meta-package by its name
        ("ruamel.yaml ==0.17", "ruamel.yaml.eq.0.17"),
        ("numpy *", "numpy"),
    ],
)
def test_compose_turns_specs_into_the_name(typed: str, name: str) -> None:
    composed = compose(typed, DEFAULT_META_PACKAGES)
    assert (composed.name, composed.problems) == (name, [])
    assert parse_name(name, DEFAULT_META_PACKAGES).canonical_name == name


@pytest.mark.parametrize(
    "typed, reason",
    [
        ("numpy 1.26 py311_0", "build string"),
        ("numpy >=1|<0.5", "alternatives"),
        ("conda-forge::numpy", "channel"),
        ("<script>alert(1)</script>", "package name"),
        ("numpy >=1.2.*.3", "wildcards"),
        ("foo.lt.bar", "cannot be written"),
    ],
)
def test_compose_says_why_a_spec_has_no_name(typed: str, reason: str) -> None:
    composed = compose(f"xz\n{typed}", DEFAULT_META_PACKAGES)
    assert composed.name == "xz"  # the good lines still compose
    ((line, why),) = composed.problems
    assert line == typed.strip() and reason in why


def test_failure_log_keeps_the_newest_without_credentials() -> None:
    log = Outcomes(60, recent_size=2)
    for i in range(3):
        log.failed(f"n{i}", "latest", errors.Unavailable(f"https://user:secret@example.org/t/tk-{i}/ch down"))
    assert [f.name for f in log.recent_failures()] == ["n2", "n1"]
    assert all("secret" not in f.message and "tk-" not in f.message for f in log.recent_failures())


def test_channels_are_shown_without_credentials_or_server_paths(tmp_path: Path) -> None:
    local = tmp_path / "my-channel"
    assert shown_channels(["https://u:pw@conda.example.org/t/tok-1/private", str(local), local.as_uri()]) == [
        "https://conda.example.org/private", "local channel my-channel", "local channel my-channel",
    ]


# -- the service: solves, caches, does not build ---------------------------------------
@pytest.fixture
async def service(tmp_path: Path, fixture_channel: Path, base_layout: Path):
    config = load_config(
        None, environ={}, channels=[str(fixture_channel)], base_image=f"oci:{base_layout}:bookworm",
        storage={"backend": "filesystem", "path": str(tmp_path / "store")}, package_cache=str(tmp_path / "pkgs"),
    )
    state = await AppState.open(config)
    yield ImageService(state)
    await state.close()


async def test_look_solves_once_and_never_builds(service: ImageService) -> None:
    solves, builds = counting_solves(service), counting_builds(service)
    request = parse_name("xz/tzdata", service.meta_packages)
    first = await service.look(request, Latest())
    again = await service.look(request, Latest())
    assert again is not None and solves == ["tzdata/xz"] and builds == []
    assert first.digest is None and first.layers is None
    (platform,) = first.solved.platforms.values()
    assert {"xz", "tzdata", "libgcc-ng"} <= {p.name for p in platform.packages}
    assert platform.lock.startswith("# platform: linux-64\n@EXPLICIT\n")

    ref = await service.resolve(request, Latest())  # the pull builds; look now shows it
    built = await service.look(request, Latest())
    assert built.digest == ref.oci_digest and solves == ["tzdata/xz", "tzdata/xz"]
    assert built.layers and {"xz", "tzdata"} <= {p.split("-")[0] for layer in built.layers for p in layer.packages}

    with pytest.raises(errors.ManifestUnknown) as failed:
        await service.look(parse_name("condery-no-such-package", service.meta_packages), Latest())
    assert "condery-no-such-package" in failed.value.message
    assert service.outcomes.recent_failures()[0].name == "condery-no-such-package"


# -- over HTTP -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory, fixture_channel, base_layout):
    tmp = tmp_path_factory.mktemp("images-api")
    with condery(tmp, [str(fixture_channel)], f"oci:{base_layout}:bookworm") as running_registry:
        yield running_registry


def get_json(registry: Registry, path: str) -> tuple[int, dict]:
    status, _, body = registry.get(path)
    return status, json.loads(body)


@pytest.mark.e2e
def test_packages_before_the_build_then_digest_and_layers(registry: Registry) -> None:
    status, image = get_json(registry, "/api/v1/images/tzdata/xz/latest")
    assert status == 200, image
    assert (image["name"], image["tag"], image["digest"], image["layers"]) == ("tzdata/xz", "latest", None, None)
    platform = image["platforms"]["linux-64"]
    xz = next(p for p in platform["packages"] if p["name"] == "xz")
    assert xz["version"] == "5.2.5" and len(xz["sha256"]) == 64 and xz["size"] > 0
    assert set(xz) >= {"name", "version", "build", "channel", "sha256", "size"}
    assert platform["size"] == sum(p["size"] for p in platform["packages"])
    assert registry.layer_keys() == set()  # solved, nothing built

    status, headers, _ = registry.get("/v2/xz/tzdata/manifests/latest", accept=(OCI_MANIFEST,))
    assert status == 200
    status, built = get_json(registry, "/api/v1/images/xz/tzdata/latest")
    assert status == 200 and built["digest"] == headers["Docker-Content-Digest"]
    ours = [layer for layer in built["layers"] if layer["packages"]]
    assert any(p.startswith("xz-5.2.5") for layer in ours for p in layer["packages"])
    assert all(layer["digest"].startswith("sha256:") and layer["size"] > 0 for layer in built["layers"])


@pytest.mark.e2e
@pytest.mark.parametrize(
    "path, status, code, says",
    [
        ("/api/v1/images/NumPy/latest", 400, "NAME_INVALID", "grammar"),
        ("/api/v1/images/" + quote("<script>x</script>", safe="") + "/latest", 400, "NAME_INVALID", "grammar"),
        ("/api/v1/images/latest", 400, "NAME_INVALID", "<name>/<tag>"),
        ("/api/v1/images/condery-no-such-package/latest", 404, "MANIFEST_UNKNOWN", "condery-no-such-package"),
        ("/api/v1/images/xz/nightly", 404, "MANIFEST_UNKNOWN", "YYYY-MM-DD"),
    ],
)
def test_errors_are_the_registrys(registry: Registry, path: str, status: int, code: str, says: str) -> None:
    assert registry.error_code(path)[:2] == (status, code)
    message = registry.error_code(path)[2]
    assert says in message and str(registry.store.parent) not in message


@pytest.mark.e2e
def test_compose_endpoint(registry: Registry) -> None:
    status, answer = get_json(registry, "/api/v1/compose?specs=" + quote("scipy >1.0\nnumpy=1.26\nnumpy 1 py_0"))
    assert status == 200
    assert answer["name"] == "numpy.eq.1.26/scipy.gt.1.0"
    assert [p["spec"] for p in answer["problems"]] == ["numpy 1 py_0"]
