"""Private channels served only to their readers (auth.channels), end to end: a real
`condery serve` with a public channel and a private one served over HTTP behind a token
(tests/fixtures/token_channel.py), and skopeo.

`inhouse` is only in the private channel, `shared` is in both (a newer build in the
private one). A member of team-a pulls a name needing `inhouse`; anonymous and bob get
403 DENIED and nothing is built for them; the images API says nothing of the private
packages to them; `shared` solves for everyone, from the channels each may read.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.clients import run_tool
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.token_channel import token_channel
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("private-channels")
    public, private = tmp / "public", tmp / "private"
    write_conda_package(public, "shared", "1.0", "h0", files=[PkgFile("share/shared.txt", b"public 1.0")])
    write_conda_package(public, "publicpkg", "1.0", "h0", files=[PkgFile("share/publicpkg.txt", b"public")])
    write_conda_package(private, "inhouse", "1.0", "h0", files=[PkgFile("share/inhouse.txt", b"company secret")])
    write_conda_package(private, "shared", "2.0", "h0", files=[PkgFile("share/shared.txt", b"private 2.0")])
    index_channel(public)
    index_channel(private)
    users = tmp / "htpasswd"
    for i, (user, password) in enumerate(PASSWORDS.items()):
        run_tool(["htpasswd", "-B", "-b", *(["-c"] if i == 0 else []), str(users), user, password])
    (tmp / "groups.yaml").write_text("team-a: [alice]\n")
    with token_channel(private, "tok-123", "reader", "pw-456") as channel:
        auth = {
            "signing_secret": "a-test-signing-secret-of-enough-length-0123456789",
            "users_file": str(users),
            "groups_file": str(tmp / "groups.yaml"),
            "rules": [{"names": ["**"], "pull": ["anonymous"]}],
            "channels": [{"channel": channel.url, "read": ["group:team-a"]}],
        }
        # The private channel first: strict priority gives its members the private build.
        with condery(tmp, [channel.url, str(public)], "scratch", auth=auth) as running:
            yield running


def skopeo(registry: Registry, name: str, dest: Path, *creds: str) -> subprocess.CompletedProcess[str]:
    return run_tool(["skopeo", "copy", "--src-tls-verify=false", *creds, f"docker://{registry.host}/{name}:latest",
                     f"oci:{dest}:latest"], check=False)


def layer_files(layout: Path) -> dict[str, bytes]:
    import tarfile

    found = {}
    for blob in (layout / "blobs" / "sha256").iterdir():
        if blob.read_bytes()[:2] == b"\x1f\x8b":
            with tarfile.open(blob) as tar:
                for member in tar:
                    if member.isreg() and member.name.startswith("opt/conda/share/"):
                        found[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def test_a_private_channels_package_is_for_its_readers_only(registry: Registry, tmp_path: Path) -> None:
    for who, creds in {"anonymous": (), "bob": ("--src-creds", f"bob:{PASSWORDS['bob']}")}.items():
        refused = skopeo(registry, "inhouse", tmp_path / who, *creds)
        assert refused.returncode != 0 and "denied" in refused.stderr.lower(), (who, refused.stderr)
    assert registry.layer_keys() == set()  # nothing was built for them
    status, _, body = registry.get("/v2/inhouse/manifests/latest")
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED"
    assert b"company" not in body and b"1.0" not in body
    status, _, body = registry.get("/api/v1/images/inhouse/latest")  # the images API says nothing either
    assert status == 403 and b"inhouse-1.0" not in body

    pulled = skopeo(registry, "inhouse", tmp_path / "alice", "--src-creds", f"alice:{PASSWORDS['alice']}")
    assert pulled.returncode == 0, pulled.stderr
    assert layer_files(tmp_path / "alice")["opt/conda/share/inhouse.txt"] == b"company secret"


def test_a_name_both_channels_have_solves_from_what_each_may_read(registry: Registry, tmp_path: Path) -> None:
    assert skopeo(registry, "shared", tmp_path / "anon").returncode == 0
    assert layer_files(tmp_path / "anon")["opt/conda/share/shared.txt"] == b"public 1.0"
    assert skopeo(registry, "shared", tmp_path / "alice", "--src-creds", f"alice:{PASSWORDS['alice']}").returncode == 0
    assert layer_files(tmp_path / "alice")["opt/conda/share/shared.txt"] == b"private 2.0"
    status, _, body = registry.get("/api/v1/images/shared/latest")
    packages = json.loads(body)["platforms"]["linux-64"]["packages"]
    assert [(p["name"], p["version"]) for p in packages] == [("shared", "1.0")]
    assert skopeo(registry, "publicpkg", tmp_path / "public").returncode == 0
