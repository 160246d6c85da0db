"""Session-wide test data and clients; the logic lives in tests/fixtures/."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

# Fixtures that live beside the servers they start (docker-registry, SeaweedFS).
pytest_plugins = ["tests.fixtures.upstream", "tests.fixtures.seaweed"]

from tests.fixtures.base_image import glibc_base_layout
from tests.fixtures.channel import build_bad_hash_channel, build_fixture_channel, build_malformed_channel
from tests.fixtures.clients import Podman
from tests.fixtures.python_package import python_package


@pytest.fixture(scope="session")
def base_layout() -> Path:
    """OCI layout of the glibc base image, tag `bookworm` (cached across runs)."""
    return glibc_base_layout()


@pytest.fixture(scope="session")
def python_pkg() -> Path:
    """The conda package of the running interpreter (cached across runs)."""
    return python_package()


@pytest.fixture(scope="session")
def fixture_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The indexed fixture channel directory; `.as_uri()` gives its file:// URL."""
    return build_fixture_channel(tmp_path_factory.mktemp("fixture-channel"))


@pytest.fixture(scope="session")
def fixture_channel_url(fixture_channel: Path) -> str:
    return fixture_channel.as_uri()


@pytest.fixture
def malformed_channel(tmp_path: Path) -> Path:
    return build_malformed_channel(tmp_path / "malformed-channel")


@pytest.fixture
def bad_hash_channel(tmp_path: Path) -> Path:
    return build_bad_hash_channel(tmp_path / "bad-hash-channel")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path under /tmp.

    Installing the python package on the host replaces its binary placeholder (the
    interpreter's own prefix, ~31 bytes) in place, so the target prefix must not be
    longer than that; pytest's tmp_path is.
    """
    path = Path(tempfile.mkdtemp(prefix="c", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def podman() -> Iterator[Podman]:
    """podman with storage and settings of its own, removed after the test.

    Under a short /tmp path: podman's run root holds unix sockets, whose paths are
    limited to 108 bytes.
    """
    client = Podman(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    yield client
    client.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session for tests that call condery's upstream code directly."""
    async with aiohttp.ClientSession() as client:
        yield client
