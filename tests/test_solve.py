"""Solve errors: the solver's explanation, without the server's file system."""

from __future__ import annotations

from pathlib import Path

import pytest
import rattler

from condery.layers.solve import ChannelUnavailable, SolveError, SolveRequest, solve


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
