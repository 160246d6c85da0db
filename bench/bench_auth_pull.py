"""Benchmark: what `auth:` costs a warm pull.

    python3 bench/bench_auth_pull.py [--packages 60] [--repeat 5] [--source CHECKOUT]

Two `condery serve` processes on one generated channel (`--packages` small packages, one
image holding them all), the same store layout and configuration but for `auth:` (the
second with an htpasswd user and a rule that lets any authenticated user pull). Each
image is built once; then, best of --repeat:

- a warm `skopeo copy` of the image (the token flow, the manifest, every blob);
- every blob of the image fetched once more with a bearer token (HEAD, as clients check
  before they download): the per-request cost of the pull rule and of the check that the
  digest belongs to an image of this name (build/service.py `holds`).

Printed: seconds, and auth's ratio to the same requests without auth.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures.clients import run_tool  # noqa: E402
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package  # noqa: E402
from tests.test_e2e import Registry, condery  # noqa: E402

USER, PASSWORD = "bench", "bench-Secret-1"


def channel_of(root: Path, packages: int) -> list[str]:
    names = [f"pkg{i:03d}" for i in range(packages)]
    for name in names:
        write_conda_package(root, name, "1.0", "h0", files=[PkgFile(f"share/{name}/data.txt", name.encode() * 100)])
    index_channel(root)
    return names


def token(registry: Registry, name: str) -> str | None:
    connection = http.client.HTTPConnection(registry.host, timeout=60)
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    connection.request("GET", f"/token?service=condery&scope=repository:{name}:pull",
                       headers={"Authorization": f"Basic {basic}"})
    answer = connection.getresponse()
    body = answer.read()
    return json.loads(body)["token"] if answer.status == 200 else None


def blobs_of(registry: Registry, name: str, bearer: str | None) -> list[str]:
    connection = http.client.HTTPConnection(registry.host, timeout=600)
    headers = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    connection.request("GET", f"/v2/{name}/manifests/latest", headers=headers)
    answer = connection.getresponse()
    manifest = json.loads(answer.read())
    if answer.status != 200:
        raise RuntimeError(f"manifest: {answer.status} {manifest}")
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def head_all(registry: Registry, name: str, digests: list[str], bearer: str | None) -> float:
    connection = http.client.HTTPConnection(registry.host, timeout=60)
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    started = time.perf_counter()
    for digest in digests:
        connection.request("HEAD", f"/v2/{name}/blobs/{digest}", headers=headers)
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"HEAD {digest}: {answer.status}")
    return time.perf_counter() - started


def skopeo_copy(registry: Registry, name: str, dest: Path, with_auth: bool) -> float:
    creds = [f"--src-creds={USER}:{PASSWORD}"] if with_auth else []
    started = time.perf_counter()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", *creds,
                    f"docker://{registry.host}/{name}:latest", f"oci:{dest}:latest"], check=True, capture_output=True)
    return time.perf_counter() - started


def measure(registry: Registry, name: str, work: Path, with_auth: bool, repeat: int) -> tuple[float, float, int]:
    skopeo_copy(registry, name, work / "build", with_auth)  # builds it
    copies = []
    for i in range(repeat):
        copies.append(skopeo_copy(registry, name, work / f"copy{i}", with_auth))
    bearer = token(registry, name) if with_auth else None
    digests = blobs_of(registry, name, bearer)
    heads = [head_all(registry, name, digests, bearer) for _ in range(repeat)]
    return min(copies), min(heads), len(digests)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packages", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="the checkout whose condery serves (another commit's, for a before/after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="condery-bench-auth-") as tmp:
        work = Path(tmp)
        channel, name = work / "channel", "bench"  # a meta-package of every package
        specs = channel_of(channel, args.packages)
        users = work / "htpasswd"
        run_tool(["htpasswd", "-B", "-b", "-c", str(users), USER, PASSWORD])
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        key = ec.generate_private_key(ec.SECP256R1())
        (work / "signing.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption()))
        auth = {"signing_key_file": str(work / "signing.pem"), "users_file": str(users),
                "rules": [{"names": ["**"], "pull": ["authenticated"]}]}
        results = {}
        for label, extra in (("without auth", {}), ("with auth", {"auth": auth})):
            here = work / label.replace(" ", "-")
            here.mkdir()
            with condery(here, [str(channel)], "scratch", env={"PYTHONPATH": str(args.source)},
                         layer_budget=args.packages + 5, meta_packages={name: {"specs": specs}},
                         **extra) as registry:
                results[label] = measure(registry, name, here, bool(extra), args.repeat)
    copy0, head0, count = results["without auth"]
    copy1, head1, _ = results["with auth"]
    print(f"warm pull of one image of {args.packages} packages ({count} blobs), best of {args.repeat}")
    print(f"  {'':34s} {'without auth':>12s} {'with auth':>10s} {'ratio':>7s}")
    print(f"  {'skopeo copy (token flow + all)':34s} {copy0:12.3f} {copy1:10.3f} {copy1 / copy0:6.2f}x")
    print(f"  {f'HEAD of every blob ({count})':34s} {head0:12.3f} {head1:10.3f} {head1 / head0:6.2f}x")
    print(f"  {'per blob request, ms':34s} {head0 / count * 1000:12.2f} {head1 / count * 1000:10.2f}")


if __name__ == "__main__":
    main()
