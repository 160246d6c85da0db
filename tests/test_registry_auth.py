"""Private and multi-platform base images, and tag refresh (bases/auth.py, upstream.py,
resolve.py) against real registries: CNCF Distribution with htpasswd Basic auth or
token auth, real credential-helper processes, and small aiohttp servers where a test
needs a behaviour Distribution does not have (a cross-origin blob redirect).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from aiohttp import web

from condery.config import ConfigError, effective_yaml, load_config
from condery.bases import resolve as base_image
from condery.records.kinds import BASE_IMAGES as RECORD_KIND
from condery.bases.errors import BaseImageError
from condery.bases.resolve import resolve_base_image
from condery.oci.references import references, select_platform
from condery.oci.manifest import Descriptor, oci_index, sha256_digest
from condery.oci.media_types import OCI_MANIFEST
from condery.oci.platforms import OciPlatform, oci_platform
from condery.bases.auth import (
    Credentials,
    RegistryAuth,
    RegistryAuthError,
    default_auth_files,
    normalise_key,
)
from condery.bases.upstream import ImageReference, UpstreamClient
from condery.storage.filesystem import FilesystemStore
from tests.fixtures.upstream import (
    BASIC_PASSWORD,
    BASIC_USER,
    Registry,
    basic_auth_entry,
    docker_config,
    make_tar,
    write_layout,
    write_multi_platform_layout,
)

AMD64 = OciPlatform("linux", "amd64")
BUDGET = 100
HELPER = "condery-test"


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "store")


def small_layout(path: Path, text: str, tag: str = "v1"):  # type: ignore[no-untyped-def]
    return write_layout(path, [make_tar({"etc/base-version": text.encode()})], tag=tag)


def write_helper(directory: Path, body: str) -> Path:
    """A `docker-credential-condery-test` program on a PATH of its own; `body` is shell
    that reads the server from stdin (it is logged to `stdin.log` beside it)."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / f"docker-credential-{HELPER}"
    script.write_text(f'#!/bin/sh\n[ "$1" = get ] || exit 3\nread -r server\n'
                      f'echo "$server" >> "{directory}/stdin.log"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return directory


def answer(user: str, secret: str) -> str:
    return f"printf '%s' '{json.dumps({'ServerURL': 'x', 'Username': user, 'Secret': secret})}'"


# --- reading auth files ---------------------------------------------------------------


async def test_auths_entries_in_their_forms(tmp_path: Path) -> None:
    path = docker_config(tmp_path / "config.json", {"auths": {
        "registry.example.org": basic_auth_entry("alice", "pw:with:colons"),
        "https://registry.example.org/team/": {"username": "bob", "password": "bobs"},
        "https://index.docker.io/v1/": basic_auth_entry("hubuser", "hubpw"),
        "tokens.example.org": {"identitytoken": "refresh-me"},
        "empty.example.org": {},
    }})
    auth = RegistryAuth.from_setting(str(path))
    found = await auth.lookup("registry.example.org", "other/repo")
    assert (found.username, found.password) == ("alice", "pw:with:colons")
    # the most specific key wins: registry/namespace before registry
    found = await auth.lookup("registry.example.org", "team/base")
    assert (found.username, found.password) == ("bob", "bobs")
    found = await auth.lookup(ImageReference.parse("debian:12").registry, "library/debian")
    assert (found.username, found.password) == ("hubuser", "hubpw")
    found = await auth.lookup("tokens.example.org", "x")
    assert found.identity_token == "refresh-me"
    assert await auth.lookup("empty.example.org", "x") is None
    assert await auth.lookup("elsewhere.example.org", "x") is None
    # secrets stay out of reprs (and so out of any log line that formats one)
    assert "pw:with" not in repr(await auth.lookup("registry.example.org", "r"))


def test_key_normalisation() -> None:
    assert normalise_key("https://index.docker.io/v1/") == "registry-1.docker.io"
    assert normalise_key("docker.io") == "registry-1.docker.io"
    assert normalise_key("http://127.0.0.1:5000/v2/") == "127.0.0.1:5000"
    assert normalise_key("Quay.io/org/repo") == "quay.io/org/repo"


@pytest.mark.parametrize("content, match", [
    ("not json", "not a JSON object"),
    ('{"auths": {"r.example.org": {"auth": "%%%"}}}', "not base64"),
])
async def test_unreadable_auth_files_say_what_without_the_path(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "secret-dir" / "config.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(RegistryAuthError, match=match) as caught:
        await RegistryAuth.from_setting(str(path)).lookup("r.example.org", "x")
    assert "secret-dir" not in str(caught.value)
    with pytest.raises(RegistryAuthError, match="does not exist"):
        await RegistryAuth((tmp_path / "missing.json",), explicit=True).lookup("r.example.org", "x")


async def test_default_file_order(tmp_path: Path) -> None:
    runtime = docker_config(tmp_path / "run" / "containers" / "auth.json",
                            {"auths": {"a.example.org": basic_auth_entry("from-runtime", "1")}})
    docker = docker_config(tmp_path / "docker" / "config.json", {"auths": {
        "a.example.org": basic_auth_entry("from-docker", "2"), "b.example.org": basic_auth_entry("docker-b", "3")}})
    environ = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "DOCKER_CONFIG": str(tmp_path / "docker"), "HOME": "/nowhere"}
    assert default_auth_files(environ) == (runtime, docker)
    auth = RegistryAuth(default_auth_files(environ))
    assert (await auth.lookup("a.example.org", "x")).username == "from-runtime"  # the first file with an entry
    assert (await auth.lookup("b.example.org", "x")).username == "docker-b"  # falls through to the next
    # REGISTRY_AUTH_FILE alone, when set; ~/.docker/config.json without DOCKER_CONFIG
    assert default_auth_files({**environ, "REGISTRY_AUTH_FILE": "/x/auth.json"}) == (Path("/x/auth.json"),)
    assert default_auth_files({"HOME": "/home/u"}) == (Path("/home/u/.docker/config.json"),)


# --- credential helpers (real processes) ----------------------------------------------------


async def test_cred_helpers_and_creds_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = write_helper(tmp_path / "bin", f'''case "$server" in
  *helped.example.org*) {answer("helped-user", "helped-secret")} ;;
  *tokens.example.org*) {answer("<token>", "an-identity-token")} ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac''')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = docker_config(tmp_path / "config.json", {
        "credHelpers": {"helped.example.org": HELPER},
        "auths": {"plain.example.org": basic_auth_entry("plain", "p")},
        "credsStore": HELPER,
    })
    auth = RegistryAuth.from_setting(str(path))
    found = await auth.lookup("helped.example.org", "x")
    assert (found.username, found.password, found.source) == (
        "helped-user", "helped-secret", f"credential helper docker-credential-{HELPER}")
    assert (await auth.lookup("plain.example.org", "x")).username == "plain"  # auths before credsStore
    assert (await auth.lookup("tokens.example.org", "x")).identity_token == "an-identity-token"
    assert await auth.lookup("unknown.example.org", "x") is None  # the helper's "not found"
    assert await auth.lookup("registry-1.docker.io", "library/debian") is None
    # the helper was asked with the registry's name (Docker Hub's by its v1 URL) on stdin
    assert (bin_dir / "stdin.log").read_text().split() == [
        "helped.example.org", "tokens.example.org", "unknown.example.org", "https://index.docker.io/v1/"]


async def test_failing_hanging_and_missing_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = docker_config(tmp_path / "config.json", {"credsStore": HELPER})
    monkeypatch.setenv("PATH", f"{write_helper(tmp_path / 'fail', 'echo leaked-secret >&2; exit 7')}{os.pathsep}"
                               f"{os.environ['PATH']}")
    with pytest.raises(RegistryAuthError, match="exit status 7") as caught:
        await RegistryAuth.from_setting(str(path)).lookup("r.example.org", "x")
    assert "leaked-secret" not in str(caught.value)
    monkeypatch.setenv("PATH", f"{write_helper(tmp_path / 'hang', 'exec sleep 30')}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    with pytest.raises(RegistryAuthError, match="did not answer within 0.5 seconds"):
        await RegistryAuth((path,), helper_timeout=0.5).lookup("r.example.org", "x")
    assert time.monotonic() - started < 5
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RegistryAuthError, match="not installed"):
        await RegistryAuth.from_setting(str(path)).lookup("r.example.org", "x")
    bad = docker_config(tmp_path / "bad.json", {"credsStore": "../../bin/sh"})
    with pytest.raises(RegistryAuthError, match="not a plain name"):
        await RegistryAuth.from_setting(str(bad)).lookup("r.example.org", "x")


# --- Basic and token registries ----------------------------------------------------------


async def test_basic_auth_registry(basic_registry: Registry, tmp_path: Path, store, session) -> None:
    layout = small_layout(tmp_path / "layout", "private")
    basic_registry.push(layout.path, "private/base:v1", "v1")
    spec = f"{basic_registry.host}/private/base:v1"
    good = docker_config(tmp_path / "good.json",
                         {"auths": {basic_registry.host: basic_auth_entry(BASIC_USER, BASIC_PASSWORD)}})
    image = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET,
                                     auth=RegistryAuth.from_setting(str(good)))
    assert [layer.digest for layer in image.layers] == list(layout.layer_digests)


async def test_basic_auth_refusals_name_the_registry_not_the_password(
    basic_registry: Registry, tmp_path: Path, store, session, caplog: pytest.LogCaptureFixture
) -> None:
    basic_registry.push(small_layout(tmp_path / "layout", "private").path, "private/base:v1", "v1")
    spec = f"{basic_registry.host}/private/base:v1"
    wrong = docker_config(tmp_path / "wrong.json",
                          {"auths": {basic_registry.host: basic_auth_entry(BASIC_USER, "wrong-Pa55word")}})
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BaseImageError) as refused:
        await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET,
                                 auth=RegistryAuth.from_setting(str(wrong)))
    message = str(refused.value)
    assert "unauthorized" in message and basic_registry.host in message and "refused the credentials" in message
    with pytest.raises(BaseImageError, match="asks for a user name and password and none is configured") as none:
        await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET,
                                 auth=RegistryAuth.from_setting(str(docker_config(tmp_path / "e.json", {}))))
    for text in (message, str(none.value), caplog.text):
        assert "wrong-Pa55word" not in text and BASIC_PASSWORD not in text and str(tmp_path) not in text
    assert await store.list_records(RECORD_KIND) == []


async def test_token_server_gets_the_credentials(token_registry: Registry, tmp_path: Path, store, session) -> None:
    layout = small_layout(tmp_path / "layout", "token")
    token_registry.push(layout.path, "private/base:v1", "v1")
    assert token_registry.token_server is not None
    pushes = len(token_registry.token_server.requests)
    path = docker_config(tmp_path / "config.json", {"auths": {token_registry.host: basic_auth_entry("tok", "en")}})
    await resolve_base_image(f"{token_registry.host}/private/base:v1", AMD64, store, session,
                             layer_budget=BUDGET, auth=RegistryAuth.from_setting(str(path)))
    assert token_registry.token_server.authorizations[pushes:] == [Credentials("tok", "en").basic()]
    assert token_registry.token_server.requests[pushes:] == [
        {"scope": ["repository:private/base:pull"], "service": ["condery-test-registry"]}]


async def test_identity_token_is_a_refresh_token_grant(aiohttp_server, tmp_path: Path, session) -> None:
    seen: list[dict[str, str]] = []

    async def token(request: web.Request) -> web.Response:
        seen.append(dict(await request.post()))
        return web.json_response({"access_token": "granted"})

    async def manifest(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer granted":
            realm = f"http://127.0.0.1:{request.url.port}/token"
            return web.Response(status=401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="svc"'})
        return web.Response(body=b'{"mediaType": "%s"}' % OCI_MANIFEST.encode(), content_type=OCI_MANIFEST)

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/v2/r/manifests/v1", manifest)
    server = await aiohttp_server(app, host="127.0.0.1")
    host = f"127.0.0.1:{server.port}"
    path = docker_config(tmp_path / "config.json", {"auths": {host: {"identitytoken": "refresh-me"}}})
    client = UpstreamClient(session, auth=RegistryAuth.from_setting(str(path)))
    await client.get_manifest(ImageReference.parse(f"{host}/r:v1"), "v1")
    assert seen == [{"grant_type": "refresh_token", "refresh_token": "refresh-me", "client_id": "condery",
                     "scope": "repository:r:pull", "service": "svc"}]


async def test_credentials_stay_with_their_registry_across_a_blob_redirect(aiohttp_server, tmp_path: Path,
                                                                           session) -> None:
    """Blob GETs are often redirected to S3 or a CDN: the registry's Authorization must not follow."""
    blob = b"a config blob"
    digest = sha256_digest(blob)
    seen_by_cdn: list[str | None] = []
    seen_by_registry: list[str | None] = []

    async def cdn(request: web.Request) -> web.Response:
        seen_by_cdn.append(request.headers.get("Authorization"))
        return web.Response(body=blob)

    cdn_app = web.Application()
    cdn_app.router.add_get("/object", cdn)
    cdn_server = await aiohttp_server(cdn_app, host="127.0.0.1")

    async def registry_blob(request: web.Request) -> web.Response:
        seen_by_registry.append(request.headers.get("Authorization"))
        if "Authorization" not in request.headers:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        # another origin: "localhost" is not "127.0.0.1" to an origin check
        raise web.HTTPTemporaryRedirect(f"http://localhost:{cdn_server.port}/object")

    app = web.Application()
    app.router.add_get(f"/v2/r/blobs/{digest}", registry_blob)
    server = await aiohttp_server(app, host="127.0.0.1")
    host = f"127.0.0.1:{server.port}"
    path = docker_config(tmp_path / "config.json", {"auths": {host: basic_auth_entry("u", "p")}})
    client = UpstreamClient(session, auth=RegistryAuth.from_setting(str(path)))
    assert await client.get_small_blob(ImageReference.parse(f"{host}/r:v1"), digest, len(blob), 1 << 20) == blob
    assert seen_by_registry == [None, Credentials("u", "p").basic()]
    assert seen_by_cdn == [None]


# --- multi-platform bases ---------------------------------------------------------------


def test_arm64_variant_normalisation() -> None:
    arm64_v8 = oci_platform("linux-aarch64")
    assert arm64_v8 == OciPlatform("linux", "arm64", "v8")

    def entry(digest_of: str, *platform: str | None) -> dict:
        return Descriptor(OCI_MANIFEST, sha256_digest(digest_of.encode()), 1,
                          platform=OciPlatform(*platform)).to_json()  # type: ignore[arg-type]

    # registries write arm64 with or without its v8 variant: both are linux-aarch64
    def pick(index: dict, platform: OciPlatform):  # type: ignore[no-untyped-def]
        return select_platform(references(json.dumps(index).encode()).manifests, platform)

    plain = {"manifests": [entry("amd", "linux", "amd64"), entry("arm", "linux", "arm64")]}
    assert pick(plain, arm64_v8).digest == sha256_digest(b"arm")
    assert pick(plain, AMD64).digest == sha256_digest(b"amd")
    # an exact variant beats a bare entry, and arm/v7 is not arm64
    mixed = {"manifests": [entry("arm-v7", "linux", "arm", "v7"), entry("bare", "linux", "arm64"),
                           entry("v8", "linux", "arm64", "v8"), entry("att", "unknown", "unknown")]}
    assert pick(mixed, arm64_v8).digest == sha256_digest(b"v8")
    assert pick(mixed, AMD64) is None
    assert json.loads(oci_index([], None))["manifests"] == []


async def test_each_platform_gets_its_child_of_a_pushed_index(upstream_registry: Registry, tmp_path: Path,
                                                              store, session) -> None:
    arm64 = OciPlatform("linux", "arm64")  # pushed without a variant, as many registries hold it
    layouts = write_multi_platform_layout(tmp_path / "multi", {
        AMD64: [make_tar({"etc/arch": b"amd64"})], arm64: [make_tar({"etc/arch": b"arm64"})]}, tag="v1")
    upstream_registry.push(tmp_path / "multi", "multi/base:v1", "v1", all_platforms=True)
    spec = f"{upstream_registry.host}/multi/base:v1"
    amd = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET)
    arm = await resolve_base_image(spec, oci_platform("linux-aarch64"), store, session, layer_budget=BUDGET)
    assert [layer.digest for layer in amd.layers] == list(layouts[AMD64].layer_digests)
    assert [layer.digest for layer in arm.layers] == list(layouts[arm64].layer_digests)
    assert arm.config["architecture"] == "arm64"
    with pytest.raises(BaseImageError, match=f"base image {upstream_registry.host}/multi/base:v1: "
                                             "the image index has no manifest for linux/s390x"):
        await resolve_base_image(spec, OciPlatform("linux", "s390x"), store, session, layer_budget=BUDGET)


# --- refresh of a tag ----------------------------------------------------------------------


async def test_a_tag_is_refreshed_on_schedule_a_digest_never(
    upstream_registry: Registry, tmp_path: Path, store, session, caplog: pytest.LogCaptureFixture
) -> None:
    first = small_layout(tmp_path / "one", "one")
    upstream_registry.push(first.path, "moving/base:v1", "v1")
    tag_spec = f"{upstream_registry.host}/moving/base:v1"
    pinned_spec = f"{upstream_registry.host}/moving/base@{first.manifest_digest}"

    async def resolve(spec: str, refresh: float = 1):  # type: ignore[no-untyped-def]
        return await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET, refresh=refresh)

    before = await resolve(tag_spec)
    pinned = await resolve(pinned_spec)
    assert before.layers == pinned.layers and [d.digest for d in before.layers] == list(first.layer_digests)

    second = small_layout(tmp_path / "two", "two")
    upstream_registry.push(second.path, "moving/base:v1", "v1")  # the tag moves upstream
    assert await resolve(tag_spec) == before  # within the refresh interval: the stored answer
    time.sleep(1.1)
    after = await resolve(tag_spec)
    assert [d.digest for d in after.layers] == list(second.layer_digests)
    assert await resolve(pinned_spec) == pinned  # a digest never moves

    # the registry goes away: the last good base stands in (stale-if-error), with a log line
    upstream_registry.stop()
    time.sleep(1.1)
    started = time.monotonic()
    assert await resolve(tag_spec) == after
    assert "refresh failed, using the base resolved before" in caplog.text
    # and the failed refresh is not retried at once: the next resolve asks no one
    caplog.clear()
    assert await resolve(tag_spec, refresh=1) == after
    assert "refresh failed" not in caplog.text
    assert time.monotonic() - started < 10


async def test_an_unmoved_tag_is_not_imported_again(upstream_registry: Registry, tmp_path: Path, store,
                                                     session) -> None:
    layout = small_layout(tmp_path / "one", "one")
    upstream_registry.push(layout.path, "still/base:v1", "v1")
    spec = f"{upstream_registry.host}/still/base:v1"
    first = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET, refresh=1)
    (record_key,) = await store.list_records(RECORD_KIND)
    checked = (await store.get_record(RECORD_KIND, record_key))["checked_at"]
    time.sleep(1.1)
    assert await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET, refresh=1) == first
    record = await store.get_record(RECORD_KIND, record_key)
    assert record["checked_at"] > checked and record["root"] == layout.manifest_digest


# --- configuration -------------------------------------------------------------------------


def test_config_keys(tmp_path: Path) -> None:
    path = docker_config(tmp_path / "config.json", {})
    config = load_config(environ={}, base_image_auth_file=str(path), base_image_refresh=600)
    assert (config.base_image_auth_file, config.base_image_refresh) == (str(path), 600)
    assert load_config(environ={}).base_image_refresh == 24 * 3600
    # `condery config` shows where the credentials are (a path is no secret), loadable again
    assert f"base_image_auth_file: {path}" in effective_yaml(config, environ={})
    with pytest.raises(ConfigError, match="base_image_auth_file: .* is not a file"):
        load_config(environ={}, base_image_auth_file=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="base_image_refresh: 0 is out of range"):
        load_config(environ={}, base_image_refresh=0)


async def test_a_hanging_registry_does_not_hold_a_refresh(
    upstream_registry: Registry, tmp_path: Path, store, session, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream_registry.push(small_layout(tmp_path / "one", "one").path, "hung/base:v1", "v1")
    spec = f"{upstream_registry.host}/hung/base:v1"
    first = await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET, refresh=1)
    upstream_registry.stop()
    # the registry's port now accepts connections and never answers
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(upstream_registry.host.rsplit(":", 1)[1])))
        listener.listen(8)
        monkeypatch.setattr(base_image, "REFRESH_CHECK_TIMEOUT", 0.5)
        time.sleep(1.1)
        started = time.monotonic()
        assert await resolve_base_image(spec, AMD64, store, session, layer_budget=BUDGET, refresh=1) == first
        assert time.monotonic() - started < 3
