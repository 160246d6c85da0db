"""Who may pull what, end to end: a real `condery serve` with `auth:`, and real clients.

podman login + pull, skopeo copy --src-creds, skopeo with a docker config.json
(--authfile, a robot account as for a Kubernetes imagePullSecret), ctr image pull
--user (containerd's OAuth2 POST to /token). Without credentials, with a wrong password
and as a user outside the group, every client is refused and nothing is built (the
store holds no layer or image record). 1,000 wrong passwords from one address get 429
while other addresses are served. A configuration error stops `condery serve` with one
line. Nothing of a password or token reaches condery's log.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fixtures.clients import ClientError, Podman, oci_validate, run_tool
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.fixtures.containerd import containerd
from tests.fixtures.procs import free_port, running
from tests.test_e2e import Registry, condery

pytestmark = pytest.mark.e2e

PASSWORDS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2"}
ROBOT_TOKEN = "robot-token-0f3c9a7e5d1b2468ace0f3c9a7e5d1b2"


def image_records(registry: Registry) -> set[str]:
    root = registry.store / "records"
    return {p.relative_to(root).as_posix() for p in root.rglob("*.json")} if root.exists() else set()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    tmp = tmp_path_factory.mktemp("condery-auth")
    channel = tmp / "channel"
    for name in ("secretpkg", "publicpkg", "otherpkg"):
        write_conda_package(channel, name, "1.0", "h0", files=[PkgFile(f"share/{name}.txt", name.encode())])
    index_channel(channel)
    users = tmp / "htpasswd"
    for i, (user, password) in enumerate(PASSWORDS.items()):  # the real tool, bcrypt as documented
        run_tool(["htpasswd", "-B", "-b", *(["-c"] if i == 0 else []), str(users), user, password])
    (tmp / "groups.yaml").write_text("team-a: [alice]\n")
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp / "signing.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    import hashlib

    auth = {
        "signing_key_file": str(tmp / "signing.pem"),
        "users_file": str(users),
        "groups_file": str(tmp / "groups.yaml"),
        "robots": {"ci": {"token_sha256": hashlib.sha256(ROBOT_TOKEN.encode()).hexdigest(), "groups": ["team-a"]}},
        "rules": [
            {"names": ["publicpkg"], "pull": ["anonymous"]},
            {"names": ["secretpkg", "otherpkg/secretpkg"], "pull": ["group:team-a"]},
            {"names": ["**"], "pull": ["authenticated"]},
        ],
        "failed_logins": {"per_client": 10, "per_user": 30, "window": 60},
    }
    with condery(tmp, [str(channel)], "scratch", auth=auth) as running:
        running.log = tmp / "condery.log"  # type: ignore[attr-defined]
        yield running


def skopeo(registry: Registry, name: str, dest: Path, *creds: str) -> subprocess.CompletedProcess[str]:
    return run_tool(["skopeo", "copy", "--src-tls-verify=false", *creds, f"docker://{registry.host}/{name}:latest",
                     f"oci:{dest}:latest"], check=False)


def test_refused_without_credentials_with_a_wrong_password_and_outside_the_group(
        registry: Registry, tmp_path: Path, podman: Podman) -> None:
    assert image_records(registry) == set()
    podman.allow_insecure(registry.host)
    ref = f"{registry.host}/secretpkg:latest"
    authfile = tmp_path / "auth.json"
    authfile.write_text("{}")  # podman's own, empty: no credentials of the machine's
    attempts = {
        "skopeo, no credentials": skopeo(registry, "secretpkg", tmp_path / "a"),
        "skopeo, wrong password": skopeo(registry, "secretpkg", tmp_path / "b", "--src-creds", "alice:wrong"),
        "skopeo, unknown user": skopeo(registry, "secretpkg", tmp_path / "c", "--src-creds", "mallory:x"),
        "skopeo, robot, wrong token": skopeo(registry, "secretpkg", tmp_path / "d", "--src-creds", "ci:nope"),
        "podman, no credentials": podman.podman("pull", "--authfile", str(authfile), ref, check=False),
        "podman login, wrong password": podman.podman("login", "--authfile", str(authfile), "-u", "alice",
                                                      "-p", "wrong", registry.host, check=False),
    }
    for what, result in attempts.items():
        assert result.returncode != 0, what
        said = result.stderr.lower()
        assert any(words in said for words in ("unauthorized", "authentication required", "invalid username/password")), \
            (what, result.stderr)
    # bob logs in (his password is right) but the name is team-a's: 403, "denied"
    login = podman.podman("login", "--authfile", str(authfile), "-u", "bob", "-p", PASSWORDS["bob"], registry.host)
    assert "Login Succeeded" in login.stdout
    for what, result in {
        "podman, outside the group": podman.podman("pull", "--authfile", str(authfile), ref, check=False),
        "skopeo, outside the group": skopeo(registry, "secretpkg", tmp_path / "e", "--src-creds",
                                            f"bob:{PASSWORDS['bob']}"),
    }.items():
        assert result.returncode != 0 and "denied" in result.stderr.lower(), (what, result.stderr)
    # raw answers: the spec's challenge and error body
    status, headers, body = registry.get("/v2/secretpkg/manifests/latest")
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert headers["WWW-Authenticate"] == (f'Bearer realm="http://{registry.host}/token",service="condery",'
                                           'scope="repository:secretpkg:pull"')
    assert registry.get("/healthz")[0] == 200 and registry.get("/readyz")[0] == 200
    request_status = registry.get("/api/v1/builds", method="GET")[0]
    assert request_status == 401
    # nothing was solved, built or stored for any of them
    assert registry.layer_keys() == set() and image_records(registry) == set()

    # alice, in team-a: podman login, then pull
    login = podman.podman("login", "--authfile", str(authfile), "-u", "alice", "-p", PASSWORDS["alice"],
                          registry.host)
    assert "Login Succeeded" in login.stdout
    podman.podman("pull", "--authfile", str(authfile), ref)
    assert registry.layer_keys()
    # bob's pull of a name anyone logged in may pull works too
    run_tool(["skopeo", "copy", "--src-tls-verify=false", "--src-creds", f"bob:{PASSWORDS['bob']}",
              f"docker://{registry.host}/otherpkg:latest", f"oci:{tmp_path / 'f'}:latest"])


def test_public_name_anonymously(registry: Registry, tmp_path: Path) -> None:
    result = skopeo(registry, "publicpkg", tmp_path / "oci")
    assert result.returncode == 0, result.stderr
    oci_validate(tmp_path / "oci")


def test_skopeo_with_creds_and_with_a_docker_config_json(registry: Registry, tmp_path: Path) -> None:
    result = skopeo(registry, "secretpkg", tmp_path / "creds", "--src-creds", f"alice:{PASSWORDS['alice']}")
    assert result.returncode == 0, result.stderr
    oci_validate(tmp_path / "creds")
    # what `kubectl create secret docker-registry` writes, for the robot account
    config = tmp_path / "config.json"
    auth = base64.b64encode(f"ci:{ROBOT_TOKEN}".encode()).decode()
    config.write_text(json.dumps({"auths": {registry.host: {"username": "ci", "password": ROBOT_TOKEN,
                                                            "auth": auth}}}))
    result = skopeo(registry, "otherpkg/secretpkg", tmp_path / "authfile", "--authfile", str(config))
    assert result.returncode == 0, result.stderr


def test_ctr_pull_with_user(registry: Registry) -> None:
    ref = f"{registry.host}/secretpkg:latest"
    with containerd() as daemon:
        with pytest.raises(ClientError) as refused:
            daemon.ctr("image", "pull", "--plain-http", "--user", "alice:wrong", ref)
        assert "401" in str(refused.value) or "unauthorized" in str(refused.value).lower(), str(refused.value)
        daemon.ctr("image", "pull", "--plain-http", "--user", f"alice:{PASSWORDS['alice']}", ref)
        listing = daemon.ctr("image", "ls", "-q").stdout
        assert ref in listing


def _get(address: str, port: int, path: str, headers: dict[str, str],
         connection: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str]]:
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                                          source_address=(address, 0))
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    response.read()
    return response.status, dict(response.getheaders())


def test_a_thousand_wrong_passwords(registry: Registry) -> None:
    port = int(registry.host.rsplit(":", 1)[1])
    wrong = {"Authorization": "Basic " + base64.b64encode(b"alice:guess").decode()}
    guesser = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=("127.0.0.2", 0))
    statuses = [_get("127.0.0.2", port, "/v2/", wrong, guesser)[0] for _ in range(1000)]
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses[:20]
    status, headers = _get("127.0.0.2", port, "/v2/", wrong, guesser)
    assert status == 429 and 0 < int(headers["Retry-After"]) <= 60
    # other clients are served: bob from another address, anonymous pulls of the public name
    bob = {"Authorization": "Basic " + base64.b64encode(f"bob:{PASSWORDS['bob']}".encode()).decode()}
    assert _get("127.0.0.3", port, "/v2/", bob)[0] == 200
    assert _get("127.0.0.4", port, "/v2/publicpkg/tags/list", {})[0] == 200
    assert _get("127.0.0.2", port, "/healthz", {})[0] == 200


def test_no_secret_in_the_log_and_the_user_named(registry: Registry) -> None:
    log = registry.log.read_text()  # type: ignore[attr-defined]
    for secret in (*PASSWORDS.values(), ROBOT_TOKEN, base64.b64encode(b"alice:guess").decode(), "eyJ"):
        assert secret not in log, secret
    assert "user=alice" in log and "user=ci" in log


@pytest.mark.parametrize(("auth", "line"), [
    ({"users_file": "/nonexistent/htpasswd", "signing_secret": "x" * 32},
     "condery: auth.users_file: '/nonexistent/htpasswd' is not a file"),
    ({"rules": [{"names": ["**"], "pull": ["anonymous"]}]}, "condery: auth.signing_key_file: required"),
    ("md5", "condery: auth.users_file: line 1: user 'alice' has MD5 ($apr1$); condery takes bcrypt only"),
    ("key", "condery: auth.signing_key_file: not a PEM private key"),
])
def test_configuration_errors_stop_the_start(tmp_path: Path, auth, line: str) -> None:
    if auth == "md5":
        (tmp_path / "htpasswd").write_text("alice:$apr1$abcdefgh$0123456789abcdefghijkl\n")
        auth = {"users_file": str(tmp_path / "htpasswd"), "signing_secret": "x" * 32}
    elif auth == "key":
        (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
        auth = {"signing_key_file": str(tmp_path / "key.pem")}
    config = tmp_path / "condery.yaml"
    config.write_text(yaml.safe_dump({"auth": auth, "storage": {"backend": "filesystem", "path": str(tmp_path / "s")},
                                      "channels": [str(tmp_path)], "base_image": "scratch"}))
    result = subprocess.run([sys.executable, "-m", "condery", "serve", "--config", str(config), "--port", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]] and result.stderr.startswith(line), \
        result.stderr


# -- the README's configuration, as written ---------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_auth_blocks() -> tuple[list[str], str, list[str]]:
    """The section's setup lines, its condery.yaml and its client lines, as written."""
    section = README.read_text().split("## Who may pull what", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(sh|yaml)\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    (_, setup), (_, config), (_, clients) = blocks
    lines = [line.split("  #", 1)[0].strip() for line in setup.splitlines() if line.strip()]
    client_lines = [line.strip() for line in clients.splitlines() if line.strip()]
    return lines, config, client_lines


def test_the_readme_configuration_as_written(tmp_path: Path) -> None:
    setup, config, clients = readme_auth_blocks()
    assert setup[2] == "htpasswd -B -c auth/htpasswd alice"  # interactive: the test gives the password with -b
    password = "readme-Secret-3"
    for line in setup:
        line = line.replace("htpasswd -B -c", "htpasswd -B -b -c") + (f" {password}" if line == setup[2] else "")
        subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    (tmp_path / "condery.yaml").write_text(config)
    channel = tmp_path / "channel"
    for name in ("teampkg", "publicpkg"):
        write_conda_package(channel, name, "1.0", "h0", files=[PkgFile(f"share/{name}.txt", name.encode())])
    index_channel(channel)
    (tmp_path / "envs").mkdir()
    (tmp_path / "envs" / "team-a.yml").write_text("name: team-a\ndependencies:\n  - teampkg\n")
    port = free_port()
    host = f"127.0.0.1:{port}"
    # Only what the README's file leaves out (where the packages and the store are) comes from variables.
    env = {"CONDERY_CHANNELS": f"[{channel}]", "CONDERY_BASE_IMAGE": "scratch", "CONDERY_PORT": str(port),
           "CONDERY_ENVIRONMENTS_DIR": str(tmp_path / "envs"), "CONDERY_PACKAGE_CACHE": str(tmp_path / "pkgs")}
    argv = [sys.executable, "-m", "condery", "serve", "--config", "condery.yaml"]
    with running(argv, url=f"http://{host}/healthz", env=env, cwd=tmp_path, log_path=tmp_path / "condery.log",
                 timeout=60):
        registry = Registry(f"http://{host}", host, tmp_path / "condery-data")
        status, headers, _ = registry.get("/v2/envs/team-a/manifests/latest")
        assert status == 401 and 'scope="repository:envs/team-a:pull"' in headers["WWW-Authenticate"]
        assert registry.get("/api/v1/builds", method="GET")[0] == 401
        assert registry.get("/metrics")[0] == 200
        assert registry.layer_keys() == set()
        skopeo_line = next(line for line in clients if line.startswith("skopeo copy"))
        line = skopeo_line.replace("127.0.0.1:8080", host).replace("PASSWORD", password)
        line = line.replace("skopeo copy ", "skopeo copy --src-tls-verify=false ")  # plain HTTP here
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr)
        oci_validate(tmp_path / "team-a")
        # every other name is anyone's, as without auth
        assert skopeo(registry, "publicpkg", tmp_path / "public").returncode == 0


def test_a_prebuild_is_a_pull_and_lists_show_only_what_one_may_pull(registry: Registry) -> None:
    """The builds right is not the right to build any name: bob (not in team-a) may start
    builds but not of secretpkg; the builds listing and the landing page show each caller
    only the names they may pull."""
    host, port = registry.host.split(":")

    def call(method: str, path: str, user: str, body: bytes | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
        connection.request(method, path, body=body, headers={"Authorization": f"Basic {token}"})
        answer = connection.getresponse()
        data = answer.read()
        connection.close()
        return answer.status, data

    status, body = call("POST", "/api/v1/builds", "bob", json.dumps({"name": "secretpkg"}).encode())
    assert status == 403 and json.loads(body)["errors"][0]["code"] == "DENIED", body
    status, body = call("POST", "/api/v1/builds", "alice", json.dumps({"name": "secretpkg"}).encode())
    assert status in (200, 202), body
    listed = {b["name"] for b in json.loads(call("GET", "/api/v1/builds", "bob")[1])["builds"]}
    assert "secretpkg" not in listed
    assert "secretpkg" in {b["name"] for b in json.loads(call("GET", "/api/v1/builds", "alice")[1])["builds"]}


def test_a_digest_is_fetched_only_through_a_name_that_references_it(registry: Registry, tmp_path: Path) -> None:
    """A layer of secretpkg's image, asked for under publicpkg (which anyone may pull): 404,
    as Distribution answers a blob not linked to the repository; under its own name, for
    alice: 200."""
    alice = ("--src-creds", f"alice:{PASSWORDS['alice']}")
    assert skopeo(registry, "secretpkg", tmp_path / "secret", *alice).returncode == 0
    assert skopeo(registry, "publicpkg", tmp_path / "public").returncode == 0
    index = json.loads((tmp_path / "secret" / "index.json").read_text())
    manifest = json.loads((tmp_path / "secret" / "blobs" / "sha256" /
                           index["manifests"][0]["digest"].split(":")[1]).read_text())
    secret_layer = manifest["layers"][-2]["digest"]  # secretpkg's own package layer
    status, _, body = registry.get(f"/v2/publicpkg/blobs/{secret_layer}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    status, _, _ = registry.get(f"/v2/publicpkg/manifests/{index['manifests'][0]['digest']}")
    assert status == 404
    public_index = json.loads((tmp_path / "public" / "index.json").read_text())
    assert registry.get(f"/v2/publicpkg/manifests/{public_index['manifests'][0]['digest']}")[0] == 200
    host, port = registry.host.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    token = base64.b64encode(f"alice:{PASSWORDS['alice']}".encode()).decode()
    connection.request("GET", f"/v2/secretpkg/blobs/{secret_layer}", headers={"Authorization": f"Basic {token}"})
    assert connection.getresponse().status == 200
    connection.close()


def test_listings_show_each_caller_only_what_it_may_pull(tmp_path: Path) -> None:
    """The environments listing and the landing page name envs/team-a to team-a only."""
    channel = tmp_path / "channel"
    write_conda_package(channel, "publicpkg", "1.0", "h0", files=[PkgFile("share/p.txt", b"p")])
    index_channel(channel)
    folder = tmp_path / "environments"
    folder.mkdir()
    (folder / "team-a.yml").write_text("dependencies: [publicpkg]\n")
    (folder / "open.yml").write_text("dependencies: [publicpkg]\n")
    users = tmp_path / "htpasswd"
    run_tool(["htpasswd", "-B", "-b", "-c", str(users), "alice", PASSWORDS["alice"]])
    (tmp_path / "groups.yaml").write_text("team-a: [alice]\n")
    auth = {
        "signing_secret": "a-test-signing-secret-of-enough-length-0123456789",
        "users_file": str(users), "groups_file": str(tmp_path / "groups.yaml"),
        "rules": [{"names": ["envs/team-a"], "pull": ["group:team-a"]}, {"names": ["**"], "pull": ["anonymous"]}],
        "endpoints": {"environment_list": ["anonymous"], "landing": ["anonymous"]},
    }
    with condery(tmp_path, [str(channel)], "scratch", auth=auth, environments_dir=str(folder)) as registry:
        host, port = registry.host.split(":")

        def get(path: str, user: str | None = None) -> bytes:
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            headers = {}
            if user:
                headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
            connection.request("GET", path, headers=headers)
            answer = connection.getresponse()
            assert answer.status == 200, (path, answer.status)
            data = answer.read()
            connection.close()
            return data

        anonymous = {e["name"] for e in json.loads(get("/api/v1/environments"))["environments"]}
        assert anonymous == {"envs/open"}
        members = {e["name"] for e in json.loads(get("/api/v1/environments", "alice"))["environments"]}
        assert members == {"envs/open", "envs/team-a"}
        assert b"envs/team-a" not in get("/") and b"envs/open" in get("/")
        assert b"envs/team-a" in get("/", "alice")
