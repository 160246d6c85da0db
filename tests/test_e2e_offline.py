"""Without internet: what a pull says when the channel or the base registry cannot be
reached, and docs/airgapped.md's recipe run as written, ending with `podman run`.

The recipe's shell blocks are read from the doc and run with bash. Only its parameters
change: `/srv/condery-offline` becomes a temporary directory (in the doc and in
examples/airgapped.yaml), `BASE` the fixture glibc base layout (`oci:` instead of
`docker://docker.io/...`, which has no network here), the port a free one; the machine
"with network" solves against the fixture channel (through `CONDERY_*` variables, as a
configuration would say it). `.venv/bin/condery` and `.venv/bin/python` are this test's
interpreter with this checkout on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.clients import Podman
from tests.fixtures.procs import free_port, running
from tests.test_e2e import condery

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "airgapped.md"
EXAMPLE = ROOT / "examples" / "airgapped.yaml"
OFFLINE = "/srv/condery-offline"


def sh_blocks(path: Path) -> list[str]:
    """The ```sh blocks of a Markdown file, in order."""
    return re.findall(r"^```sh\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL)


def fake_venv(directory: Path) -> dict[str, str]:
    """`.venv/bin/condery` and `.venv/bin/python` in `directory`, running this checkout."""
    bin_dir = directory / ".venv" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, args in (("condery", "-m condery"), ("python", "")):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {args} "$@"\n')
        script.chmod(0o755)
    return {"PYTHONPATH": str(ROOT)}


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (script, result.stdout[-2000:], result.stderr[-4000:])
    return result


def test_unreachable_channel_and_base_registry_say_why(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with condery(tmp_path / "a", [f"http://{dead}/channel"], f"{dead}/library/debian:bookworm-slim") as registry:
        status, headers, body = registry.get("/v2/python/manifests/latest")
        assert status == 503 and headers["Retry-After"]
        message = json.loads(body)["errors"][0]["message"]
        assert f"base image {dead}/library/debian:bookworm-slim" in message and "Connect" in message
        log = (tmp_path / "a" / "condery.log").read_text()
        assert any("status=503" in line and "reason=" in line and dead in line for line in log.splitlines())

    with condery(tmp_path / "b", [f"http://{dead}/channel"], "scratch") as registry:
        status, code, message = registry.error_code("/v2/python/manifests/latest")
        assert (status, code) == (503, "UNAVAILABLE")
        # rattler's headline alone ("Request failed after 3 retries") says nothing: the URL
        # and the root cause come with it.
        assert "cannot read the channels" in message and f"http://{dead}/channel" in message
        assert "refused" in message.lower(), message
        log = (tmp_path / "b" / "condery.log").read_text()
        assert any("status=503" in line and "refused" in line.lower() for line in log.splitlines())


def test_the_airgapped_recipe_as_written_ends_with_podman_run(
    tmp_path: Path, fixture_channel: Path, base_layout: Path, podman: Podman
) -> None:
    prepare, serve, client = sh_blocks(DOC)
    offline = tmp_path / "offline"
    assert f"OFFLINE={OFFLINE}" in prepare and "BASE=docker://docker.io/library/debian:bookworm-slim" in prepare
    prepare = prepare.replace(OFFLINE, str(offline)).replace(
        "docker://docker.io/library/debian:bookworm-slim", f"oci:{base_layout}:bookworm")

    # 1. "On a machine with network": the fixture channel stands for conda-forge.
    online = tmp_path / "online"
    env = fake_venv(online)
    bash(prepare, online, {**env, "CONDERY_CHANNELS": f"[{fixture_channel}]",
                           "CONDERY_BASE_IMAGE": f"oci:{base_layout}:bookworm"})
    assert (offline / "channel" / "noarch" / "repodata.json").is_file()
    assert list((offline / "channel" / "noarch").glob("tqdm-*.conda"))
    assert (offline / "base" / "index.json").is_file()

    # 3. "On the site": the example configuration, the carried directory, nothing else.
    site = tmp_path / "site"
    env = fake_venv(site)
    port = free_port()
    config = EXAMPLE.read_text()
    assert "port: 8080" in config and config.count(OFFLINE) == 5  # channel, base, store, package cache, and the comment
    (site / "examples").mkdir()
    (site / "examples" / "airgapped.yaml").write_text(
        config.replace(OFFLINE, str(offline)).replace("port: 8080", f"port: {port}"))
    assert serve.strip() == ".venv/bin/condery serve --config examples/airgapped.yaml"
    with running(["bash", "-c", "exec " + serve.strip()], cwd=site, env=env, url=f"http://127.0.0.1:{port}/v2/",
                 log_path=tmp_path / "site.log", timeout=60):
        line = client.strip().replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        result = subprocess.run(["bash", "-c", line], env=podman.env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (result.stderr[-3000:], (tmp_path / "site.log").read_text()[-3000:])
        assert result.stdout.strip() == "4.54.1"  # tqdm from the carried channel
