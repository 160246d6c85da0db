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
from tests.fixtures.nginx import check_config
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


# -- Kubernetes ----------------------------------------------------------------------------
def condery_config(text: str, environ: dict[str, str] | None = None):  # noqa: ANN201
    """A configuration file's text loaded as condery loads it (strict: unknown keys fail)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        file.write(text)
        file.flush()
        return load_config(file.name, environ=environ or {})


def kustomize() -> dict[str, dict]:
    """deploy/k8s's resources, by kind, as `kubectl apply -k` applies them.

    The files are complete manifests (labels and selectors written out, no kustomize
    transformer but `images`), so they are read directly; where kubectl is installed its
    kustomize must render the same thing (Debian has no kubectl package to require)."""
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    resources = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            resources[doc["kind"]] = doc
    [image] = kustomization["images"]
    for container in resources["Deployment"]["spec"]["template"]["spec"]["containers"]:
        if container["image"] == image["name"]:
            container["image"] = f"{image['newName']}:{image['newTag']}"
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        assert {doc["kind"]: doc for doc in yaml.safe_load_all(out)} == resources
    return resources


def k8s_errors(resource: dict) -> list[str]:
    """What the Kubernetes schemas say about `resource` (kubernetes-validate ships them:
    no network); strict, so that a misspelt field is an error, not ignored."""
    import kubernetes_validate
    errors = []
    for version in ("1.29", kubernetes_validate.utils.latest_version()):
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{version}: {error.message} at {list(error.path)}")
    return errors


def test_the_manifests_validate_against_the_kubernetes_schemas() -> None:
    resources = kustomize()
    assert set(resources) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for kind, resource in resources.items():
        assert k8s_errors(resource) == [], kind
    # The validator does fail: a wrong type, and a field Kubernetes does not have.
    broken = json.loads(json.dumps(resources["Deployment"]))
    broken["spec"]["replicas"] = "three"
    assert k8s_errors(broken)
    broken = json.loads(json.dumps(resources["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert k8s_errors(broken)


def test_the_deployment_runs_replicas_on_the_configmap_with_probes_and_the_secret() -> None:
    resources = kustomize()
    deployment, service, pdb = resources["Deployment"], resources["Service"], resources["PodDisruptionBudget"]
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    # The Service and the budget select exactly the Deployment's pods.
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]  # a drain can proceed
    [container] = pod["spec"]["containers"]
    port = container["ports"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # The same user as the image; the root filesystem read-only since it writes only to /data.
    assert pod["spec"]["securityContext"]["runAsUser"] == NOBODY
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == one("VOLUME")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    # The ConfigMap's file is where the image's command reads it, and is a valid configuration.
    config_path = Path(container["args"][container["args"].index("--config") + 1])
    assert container["args"] == json.loads(one("CMD"))
    assert mounts["config"] == str(config_path.parent)
    assert volumes["config"]["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
    config = condery_config(resources["ConfigMap"]["data"][config_path.name])
    assert config.storage.backend == "s3" and config.port == port["containerPort"] and config.host == "0.0.0.0"
    # S3 credentials from a Secret, never in the ConfigMap.
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(secrets) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert "secret" not in resources["ConfigMap"]["data"][config_path.name].lower()


# -- compose -------------------------------------------------------------------------------
def test_the_compose_file_has_two_replicas_seaweedfs_redis_and_nginx() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"condery-1", "condery-2", "seaweedfs", "redis", "nginx"} <= set(services)
    replicas = [services["condery-1"], services["condery-2"]]
    for replica in replicas:
        assert replica["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / replica["build"]["context"] / replica["build"]["dockerfile"]).exists()
        config = condery_config((DEPLOY / "condery.yaml").read_text(), replica["environment"])
        assert config.storage.backend == "s3" and "//seaweedfs:" in config.storage.endpoint_url
        assert "redis://redis:" in replica["environment"]["CONDERY_COORDINATION"]
    # Replicas share the configuration (image keys depend on it), not their cache volumes.
    assert replicas[0]["environment"] == replicas[1]["environment"]
    assert replicas[0]["volumes"] != replicas[1]["volumes"]
    nginx_conf = [v.split(":")[0] for v in services["nginx"]["volumes"] if "nginx.conf" in v]
    assert nginx_conf == ["./nginx.conf"] and (DEPLOY / "nginx.conf").exists()


def test_the_nginx_configuration_is_valid_and_waits_for_a_cold_build(tmp_path: Path) -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    port = load_config(str(DEPLOY / "condery.yaml"), environ={}).port
    assert f"server condery-1:{port};" in text and f"server condery-2:{port};" in text
    config = load_config(str(DEPLOY / "condery.yaml"), environ={})
    read_timeout = int(text.split("proxy_read_timeout")[1].split("s;")[0])
    assert read_timeout > config.solve_timeout + config.build_timeout
    assert "proxy_next_upstream error;" in text  # no second build wait after a timeout
    # `nginx -t` on it, in an http block as conf.d has it, with the compose hostnames and
    # cache directory mapped to this machine.
    (tmp_path / "cache").mkdir()  # the nginx image has /var/cache/nginx
    check_config(text.replace("condery-1:", "127.0.0.1:").replace("condery-2:", "127.0.0.2:")
                 .replace("/var/cache/nginx", str(tmp_path / "cache")), tmp_path)
