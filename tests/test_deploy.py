"""deploy/: the container image, the Kubernetes manifests and the compose file.

There is no container engine here, so the image is tested as far as one can without
one: its Dockerfile is read (user, environment, volume, healthcheck, configuration), and
`condery serve` runs the way the image runs it, as uid 65534 whose HOME does not exist,
with the image's environment mapped onto a volume directory, against both storage
backends, and must answer /readyz, serve a pull, and write nothing outside the volume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from condery.config import load_config
from tests.fixtures.clients import skopeo_copy
from tests.fixtures.procs import free_port, running

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
NOBODY = 65534


# -- the Dockerfile ----------------------------------------------------------------------
def dockerfile(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile():
        if keyword == "ENV":
            env.update(part.split("=", 1) for part in shlex.split(rest))
    return env


def one(keyword: str) -> str:
    found = [rest for k, rest in dockerfile() if k == keyword]
    assert len(found) == 1, (keyword, found)
    return found[0]


def test_the_image_runs_as_nobody_and_keeps_its_state_in_the_volume() -> None:
    assert one("USER") == f"{NOBODY}:{NOBODY}"
    volume = one("VOLUME")
    env = image_env()
    # Every place condery or a library writes is inside the volume, not HOME=/nonexistent.
    for key in ("HOME", "XDG_CACHE_HOME", "TMPDIR", "CONDERY_PACKAGE_CACHE"):
        assert env[key] == volume or env[key].startswith(volume + "/"), key
    assert one("WORKDIR") == volume
    assert any(k == "RUN" and f"chown {NOBODY}:{NOBODY} {volume}" in rest for k, rest in dockerfile())
    # The configuration it starts with is deploy/condery.yaml, valid, its store in the volume.
    command = json.loads(one("CMD"))
    config_path = command[command.index("--config") + 1]
    assert f"deploy/condery.yaml {config_path}" in [rest for k, rest in dockerfile() if k == "COPY"]
    config = load_config(str(DEPLOY / "condery.yaml"), environ={})
    assert config.host == "0.0.0.0" and config.storage.path == volume
    assert json.loads(one("ENTRYPOINT")) == ["condery"] and command[0] == "serve"


def test_the_image_has_a_healthcheck_on_healthz() -> None:
    options, _, command = one("HEALTHCHECK").partition("CMD")
    assert "--interval" in options and "--timeout" in options
    argv = json.loads(command)
    port = load_config(str(DEPLOY / "condery.yaml"), environ={}).port
    assert f"http://127.0.0.1:{port}/healthz" in argv[-1]
    # The exact command runs against a real /healthz (and fails against a closed port).
    code = argv[-1].replace(f"127.0.0.1:{port}", "127.0.0.1:{port}")
    with condery_plain() as port_now:
        assert subprocess.run([sys.executable, "-c", code.format(port=port_now)], timeout=30).returncode == 0
    assert subprocess.run([sys.executable, "-c", code.format(port=free_port())], timeout=30,
                          capture_output=True).returncode != 0


@contextlib.contextmanager
def condery_plain() -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        argv = [sys.executable, "-m", "condery", "serve", "--port", str(port)]
        env = {"PYTHONPATH": str(REPO), "CONDERY_STORAGE": f"{{backend: filesystem, path: {tmp}/store}}"}
        with running(argv, url=f"http://127.0.0.1:{port}/healthz", env=env, log_path=Path(tmp) / "log", timeout=60):
            yield port


# -- condery serve as the image runs it --------------------------------------------------
def as_nobody(argv: list[str], mounts: Path) -> list[str]:
    """`argv` as uid/gid 65534 with no supplementary groups.

    This interpreter may live under root's 0700 home (pyenv), which nobody cannot
    enter: then the command runs in a private mount namespace where that home is an
    empty world-readable tmpfs holding only the interpreter's directory (nothing else of
    root's is visible). The host's mounts are untouched.
    """
    nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    home = Path.home().resolve()
    prefix = Path(sys.base_prefix).resolve()
    if home not in prefix.parents:
        return nobody
    keep = home / prefix.relative_to(home).parts[0]
    mounts.mkdir()
    script = (f"mount --bind {keep} {mounts} && mount -t tmpfs -o mode=0755 tmpfs {home} && "
              f"mkdir -p {keep} && mount --bind {mounts} {keep} && umount {mounts} && exec \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *nobody]


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory nobody can read (pytest's tmp_path is root's 0700 directory)."""
    root = Path(tempfile.mkdtemp(prefix="condery-deploy-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        if os.environ.get("KEEP"): print(root); return
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_serve_as_nobody_with_the_image_environment(
    backend: str, host_dir: Path, fixture_channel: Path, base_layout: Path, request: pytest.FixtureRequest,
) -> None:
    volume_in_image = one("VOLUME")
    volume = host_dir / "data"
    volume.mkdir()
    os.chown(volume, NOBODY, NOBODY)
    channel = shutil.copytree(fixture_channel, host_dir / "channel")
    base = shutil.copytree(base_layout, host_dir / "base")
    subprocess.run(["chmod", "-R", "a+rX", str(channel), str(base)], check=True)  # copied from 0700 dirs
    # The image's environment, its volume mapped here; HOME is nobody's own (/nonexistent)
    # rather than the image's, so that nothing can lean on a home directory.
    env = {key: value.replace(volume_in_image, str(volume)) for key, value in image_env().items()}
    env |= {"HOME": "/nonexistent", "PYTHONPATH": str(REPO),
            "AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials"}
    config = yaml.safe_load((DEPLOY / "condery.yaml").read_text())
    config["storage"]["path"] = str(volume)
    port = free_port()
    config |= {"host": "127.0.0.1", "port": port, "channels": [str(channel)], "base_image": f"oci:{base}:bookworm"}
    if backend == "s3":
        seaweed = request.getfixturevalue("seaweed")
        bucket = seaweed.create_bucket()
        config["storage"] = {"backend": "s3", "bucket": bucket, "endpoint_url": seaweed.endpoint_url,
                             "region": "us-east-1"}
        env |= {k: v for k, v in seaweed.env.items() if k.startswith("AWS_") and "FILE" not in k}
    (host_dir / "condery.yaml").write_text(yaml.safe_dump(config))
    marker = host_dir / "started"
    marker.touch()
    argv = as_nobody([sys.executable, "-m", "condery", "serve", "--config", str(host_dir / "condery.yaml")],
                     host_dir / "mnt")
    url = f"http://127.0.0.1:{port}"
    with running(argv, url=url + "/healthz", env=env, log_path=host_dir / "condery.log", timeout=60):
        with urllib.request.urlopen(url + "/readyz", timeout=30) as answer:
            assert answer.status == 200
        layout = skopeo_copy(f"docker://127.0.0.1:{port}/xz:latest", host_dir / "oci", "latest")
        assert (Path(layout) / "index.json").exists()
    # The process really was nobody, and its caches are where the image puts them.
    archives = list((volume / "cache" / "pkgs").rglob("*.conda")) + list((volume / "cache" / "pkgs").rglob("*.tar.bz2"))
    assert archives and all(path.stat().st_uid == NOBODY for path in archives)
    if backend == "s3":
        assert seaweed.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) > 0
    else:
        assert any((volume / "blobs").rglob("*"))
    # Nothing written by nobody outside the volume (/tmp is the place it could have).
    outside = subprocess.run(
        ["find", "/tmp", "/var/tmp", "-xdev", "-user", str(NOBODY), "-newer", str(marker),
         "-not", "-path", f"{volume}*"], capture_output=True, text=True,
    ).stdout.split()
    assert outside == []
