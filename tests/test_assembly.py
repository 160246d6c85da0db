"""assembly.py: the image settings a name's meta-packages give, solved against the fixture channel."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import pytest
import rattler

from condery.build.assembly import default_cmd, image_account, image_settings
from condery.config import Config, load_config
from condery.image.names import parse_name

CREATED = datetime(2024, 6, 1, tzinfo=timezone.utc)


def solve(channel: Path, specs: list[str]) -> list[rattler.RepoDataRecord]:
    return asyncio.run(rattler.solve([rattler.Channel(channel.as_uri())], specs, platforms=["linux-64", "noarch"]))


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(None, environ={}, meta_packages={
        "ci": {"specs": ["git"], "env": {"CI": "true"}, "labels": {"org.example.team": "ci"},
               "entrypoint": ["/bin/sh", "-c"]},
    })


def test_jupyter_runs_as_jovyan_in_its_home(config: Config, fixture_channel: Path) -> None:
    request = parse_name("jupyter/shell", config.meta_packages)
    records = solve(fixture_channel, list(request.specs))
    account = image_account(config, request, records, "root:x:0:0::/root:/bin/sh\n", None)
    assert account is not None
    assert (account.name, account.uid, account.gid, account.group) == ("jovyan", 1000, 100, "users")
    # `shell` brings bash: the user's login shell and SHELL are the environment's.
    assert account.shell == "/opt/conda/bin/bash" and account.workdir == account.home == "/home/jovyan"
    settings = image_settings(config, request, records, CREATED, "lock", account)
    assert (settings.user, settings.workdir, settings.cmd) == ("1000:100", "/home/jovyan", ("jupyterhub-singleuser",))
    assert settings.env["HOME"] == "/home/jovyan" and settings.env["SHELL"] == "/opt/conda/bin/bash"
    assert settings.env["SSL_CERT_FILE"] == "/opt/conda/ssl/cacert.pem"  # ca-certificates is in `shell`


def test_without_a_user_the_base_s_user_stays(config: Config, fixture_channel: Path) -> None:
    request = parse_name("ci/shell", config.meta_packages)
    records = solve(fixture_channel, list(request.specs))
    assert image_account(config, request, records, None, None) is None
    settings = image_settings(config, request, records, CREATED, "lock", None)
    assert settings.user is None and "HOME" not in settings.env and settings.env["CI"] == "true"
    assert settings.entrypoint == ("/bin/sh", "-c") and settings.labels["org.example.team"] == "ci"
    assert settings.default_cmd == ("/opt/conda/bin/bash",)


def test_default_cmd_prefers_bash_then_python(fixture_channel: Path) -> None:
    assert default_cmd("/p", solve(fixture_channel, ["bash", "python"])) == ("/p/bin/bash",)
    assert default_cmd("/p", solve(fixture_channel, ["python"])) == ("/p/bin/python",)
    assert default_cmd("/p", solve(fixture_channel, ["xz"])) is None
