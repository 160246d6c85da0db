"""End to end: `condery gc` run as the README documents, next to a real `condery serve`.

`latest` moves to a new package version, the store is aged (its files backdated, as
days of use would), and while a cold build waits at the channel (gated_channel.py),
`condery gc --dry-run` removes nothing and `condery gc` removes exactly the blobs only
the replaced image reached. The build then completes and both images pull with skopeo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.clients import skopeo_copy
from tests.fixtures.gated_channel import gated_channel
from tests.test_cache import MS_2024_03_01, SCRIPTED, TINY, add_version, tiny_channel
from tests.test_e2e import DOCKER_MANIFEST, OCI_MANIFEST, Registry, condery
from tests.test_e2e_builds import in_background, wait_for

pytestmark = pytest.mark.e2e
DAY = 24 * 3600


def digests(registry: Registry, name: str) -> tuple[str, str]:
    """The OCI and Docker manifest digests NAME:latest answers with now."""
    found = []
    for accept in (OCI_MANIFEST, DOCKER_MANIFEST):
        status, headers, body = registry.get(f"/v2/{name}/manifests/latest", accept=(accept,))
        assert status == 200, body
        found.append(headers["Docker-Content-Digest"])
    return found[0], found[1]


def blobs_of(registry: Registry, manifests: tuple[str, str]) -> set[str]:
    """The manifests and every blob they name, read from the store's files."""
    found = set()
    for digest in manifests:
        found.add(digest)
        document = json.loads((registry.store / "blobs" / "sha256" / digest.split(":")[1]).read_text())
        found.add(document["config"]["digest"])
        found.update(layer["digest"] for layer in document["layers"])
    return {d.split(":")[1] for d in found}


def condery_gc(config: Path, *flags: str) -> str:
    result = subprocess.run([sys.executable, "-m", "condery", "gc", "--config", str(config), *flags],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gc_next_to_a_running_registry_and_a_build_in_flight(tmp_path: Path, base_layout: Path) -> None:
    channel_dir = tiny_channel(tmp_path / "channel")
    with gated_channel(channel_dir) as gated:
        gated.packages.set()
        with condery(tmp_path, [gated.url], f"oci:{base_layout}:bookworm", latest_ttl=1,
                     gc={"keep": DAY, "grace": DAY}) as registry:
            first = digests(registry, TINY)
            add_version(channel_dir, "2.0", MS_2024_03_01)
            time.sleep(1.2)  # past latest_ttl: the next pull refreshes in the background
            second = first
            deadline = time.monotonic() + 60
            while second == first:
                assert time.monotonic() < deadline, "latest never moved to 2.0"
                time.sleep(0.2)
                second = digests(registry, TINY)
            only_first = blobs_of(registry, first) - blobs_of(registry, second)
            assert len(only_first) >= 4

            # Two days of use, seen from the files' times.
            old = time.time() - 2 * DAY
            for path in registry.store.rglob("*"):
                os.utime(path, (old, old))
            before = registry.blob_names()

            gated.packages.clear()  # a cold build that waits at the channel meanwhile
            thread, result = in_background(registry, SCRIPTED)
            wait_for(lambda: gated.package_requests(SCRIPTED))

            dry = condery_gc(tmp_path / "condery.yaml", "--dry-run")
            assert registry.blob_names() == before
            assert {line.split()[3] for line in dry.splitlines() if line.startswith("would remove blob ")} \
                == {"sha256:" + d for d in only_first}

            removed = condery_gc(tmp_path / "condery.yaml")
            assert registry.blob_names() == before - only_first
            assert f"removed {len(only_first)} blobs" in removed

            gated.packages.set()
            thread.join(120)
            assert result and result[0][0] == 200, result
            skopeo_copy(f"{registry.host}/{SCRIPTED}:latest", tmp_path / "scripted", "latest")
            skopeo_copy(f"{registry.host}/{TINY}:latest", tmp_path / "tiny", "latest")
            status, _, _ = registry.get(f"/v2/{TINY}/manifests/{first[0]}", accept=(OCI_MANIFEST,))
            assert status == 404


def test_serve_collects_every_interval_and_counts_it(tmp_path: Path, base_layout: Path) -> None:
    channel_dir = tiny_channel(tmp_path / "channel")
    with condery(tmp_path, [str(channel_dir)], f"oci:{base_layout}:bookworm",
                 gc={"interval": 1, "grace": 0, "keep": 0}) as registry:
        first = digests(registry, TINY)

        def runs() -> float:
            _, _, body = registry.get("/metrics")
            lines = [line for line in body.decode().splitlines() if line.startswith('condery_gc_runs_total{result="ok"}')]
            return float(lines[0].split()[-1]) if lines else 0.0

        wait_for(lambda: runs() >= 2, timeout=30)
        # grace 0, keep 0: only what a live image reaches is left, and the image still pulls.
        assert digests(registry, TINY) == first
        skopeo_copy(f"{registry.host}/{TINY}:latest", tmp_path / "tiny", "latest")
        assert "condery_gc_freed_bytes_total" in registry.get("/metrics")[2].decode()
