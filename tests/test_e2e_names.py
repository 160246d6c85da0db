"""Helpful names through a real `condery serve`: conda syntax in a name gets the condery
spelling in its 400 NAME_INVALID, and a misspelt package gets "did you mean" in its 404,
as the error body a client reads (skopeo prints a 4xx body's message)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.fixtures.clients import run_tool
from tests.fixtures.condapkg import index_channel, write_conda_package
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("names")
    channel = tmp / "channel"
    for name in ("numpy", "scipy", "python"):
        write_conda_package(channel, name, "1.26.4", "0", files=[])
    index_channel(channel)
    with condery(tmp, [str(channel)], "scratch") as running_registry:
        yield running_registry


@pytest.mark.parametrize(
    ("typed", "spelling"),
    [
        ("numpy=1.26", "write numpy.eq.1.26"),
        ("numpy>=1.26", "write numpy.ge.1.26"),
        ("numpy<2", "write numpy.lt.2"),
        ("numpy 1.26", "write numpy.eq.1.26"),
        ("conda-forge::numpy", "write numpy; an image name cannot choose a channel"),
        ("python/numpy>=1.26,<2", "the image: numpy.ge.1.26.lt.2/python"),
    ],
)
def test_conda_syntax_is_answered_with_the_condery_spelling(registry: Registry, typed: str, spelling: str) -> None:
    path = "/".join(quote(part, safe="") for part in typed.split("/"))
    status, code, message = registry.error_code(f"/v2/{path}/manifests/latest")
    assert (status, code) == (400, "NAME_INVALID")
    assert spelling in message
    # The spelling offered pulls: the registry reads it and solves it.
    fixed = message.split("write ", 1)[1].split(";")[0].split(" ")[0]
    assert registry.get(f"/v2/{fixed}/manifests/latest", method="HEAD")[0] == 200


def test_a_misspelt_package_gets_did_you_mean(registry: Registry) -> None:
    status, code, message = registry.error_code("/v2/nump/manifests/latest")
    assert (status, code) == (404, "MANIFEST_UNKNOWN")
    assert "no package nump in the channels; did you mean numpy?" in message
    assert str(registry.store.parent) not in message
    # What a user sees: skopeo prints the message of a 4xx answer.
    result = run_tool(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.host}/scpy/python:latest"],
                      check=False, timeout=120)
    assert result.returncode != 0 and "did you mean scipy?" in result.stderr
