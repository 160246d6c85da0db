"""Solve errors: the solver's explanation, without the server's file system."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import rattler

from condery.layers.solve import ChannelUnavailable, SolveError, SolveRequest, network_reason, solve
from condery.layers.suggest import close_names
from tests.fixtures.condapkg import index_channel, write_conda_package


async def test_missing_local_channel_is_unavailable_without_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "private" / "mychannel"
    gateway = rattler.Gateway(cache_dir=tmp_path / "cache")
    with pytest.raises(ChannelUnavailable) as err:
        await solve(SolveRequest(("xz",), "linux-64"), [str(missing)], gateway, timeout=30)
    assert "local channel mychannel" in str(err.value)
    assert str(tmp_path) not in str(err.value)


async def test_unsatisfiable_is_a_solve_error_naming_the_package(fixture_channel: Path, tmp_path: Path) -> None:
    gateway = rattler.Gateway(cache_dir=tmp_path / "cache")
    with pytest.raises(SolveError) as err:
        await solve(SolveRequest(("xz >=99",), "linux-64"), [str(fixture_channel)], gateway, timeout=30)
    assert not isinstance(err.value, ChannelUnavailable)
    assert "xz" in str(err.value) and str(fixture_channel) not in str(err.value)


# -- "did you mean": close names for a package the channels do not have ---------------------
@pytest.fixture
def small_channel(tmp_path: Path) -> Path:
    channel = tmp_path / "small"
    for name in ("numpy", "scipy", "python-dateutil", "xz"):
        write_conda_package(channel, name, "1.0", "0", files=[])
    index_channel(channel)
    return channel


@pytest.mark.parametrize(
    ("specs", "says"),
    [
        (("nump",), "(no package nump in the channels; did you mean numpy?)"),
        (("numpy", "scpy >1"), "(no package scpy in the channels; did you mean scipy?)"),
        (("python_dateutil",), "did you mean python-dateutil?"),
        (("nump", "scpi"), "no package nump in the channels; did you mean numpy?; no package scpi in the channels; did you mean scipy?"),
        (("condery-nothing-like-it",), "(no package condery-nothing-like-it in the channels)"),
    ],
)
async def test_an_unknown_package_gets_close_names(small_channel: Path, tmp_path: Path, specs, says: str) -> None:
    gateway = rattler.Gateway(cache_dir=tmp_path / "cache")
    with pytest.raises(SolveError) as err:
        await solve(SolveRequest(specs, "linux-64"), [str(small_channel)], gateway, timeout=30)
    assert says in str(err.value)
    assert "No candidates were found" in str(err.value)  # the solver's own words stay first
    assert str(small_channel) not in str(err.value)


async def test_a_known_package_that_does_not_solve_gets_no_suggestion(small_channel: Path, tmp_path: Path) -> None:
    gateway = rattler.Gateway(cache_dir=tmp_path / "cache")
    with pytest.raises(SolveError) as err:
        await solve(SolveRequest(("numpy >5",), "linux-64"), [str(small_channel)], gateway, timeout=30)
    assert "did you mean" not in str(err.value) and "no package" not in str(err.value)


def test_close_names_over_a_big_list_is_quick() -> None:
    known = {f"package-{i}" for i in range(30_000)} | {"numpy"}
    started = time.monotonic()
    assert close_names("nump", known) == ["numpy"]
    assert time.monotonic() - started < 5  # conda-forge has ~30,000 names; the loop never waits on it


def test_a_network_failure_keeps_its_root_cause() -> None:
    # rattler's words for a DNS failure behind its retry middleware (seen with no network).
    error = Exception(
        "Request failed after 3 retries\n"
        "Caused by: error sending request for url (https://conda.anaconda.org/conda-forge/linux-64/repodata_shards.msgpack.zst)\n"
        "Caused by: client error (Connect)\nCaused by: dns error\n"
        "Caused by: failed to lookup address information: Name or service not known"
    )
    assert network_reason(error) == (
        "Request failed after 3 retries: error sending request for url "
        "(https://conda.anaconda.org/conda-forge/linux-64/repodata_shards.msgpack.zst): "
        "failed to lookup address information: Name or service not known"
    )
    assert network_reason(Exception("one line")) == "one line"
    assert len(network_reason(Exception("x" * 5000))) == 400


def test_a_network_reason_cut_short_keeps_no_credential() -> None:
    """Redacted before it is cut: a cut inside `user:password@` would leave no `@` to find."""
    error = Exception("Request failed after 3 retries\n"
                      "Caused by: error sending request for url (https://alice:S3cretPassw0rd@mirror.example/c/)")
    for limit in range(40, 120):
        text = network_reason(error, limit)
        assert "S3cret" not in text and "alice" not in text, (limit, text)
