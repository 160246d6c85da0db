"""Who may pull what, in process: the rules, the configuration's `auth:` section, the
token flow and its refusals over HTTP (aiohttp's test client against the real app, the
in-test builder of test_server.py), the failed-login limits and the OIDC issuer stand-in.

End to end through skopeo, podman and containerd: tests/test_e2e_auth.py.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any

import bcrypt
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from condery.auth.identities import parse_groups, parse_htpasswd
from condery.auth.ratelimit import FailedLogins
from condery.auth.rules import ANONYMOUS, Identity, Policy, glob_pattern, matches
from condery.auth.service import Authenticator
from condery.auth.tokens import Tokens, parse_scopes
from condery.config import ConfigError, effective_yaml, load_config
from condery.config.schema import FailedLoginLimits, PullRule
from condery.observability.logs import FIELDS
from condery.registry.server import create_app
from tests.test_server import InTestService, image, layer, sha256, store  # noqa: F401 - fixtures

SECRET = "0123456789abcdef0123456789abcdef-test-secret"
ALICE, BOB = ("alice", "alice-password"), ("bob", "bob-password")


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def htpasswd_line(user: str, password: str) -> str:
    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}"


def auth_files(tmp: Path) -> tuple[Path, Path]:
    users = tmp / "htpasswd"
    users.write_text("\n".join([htpasswd_line(*ALICE), htpasswd_line(*BOB)]) + "\n")
    groups = tmp / "groups.yaml"
    groups.write_text("team-a: [alice]\nadmins: [alice]\n")
    return users, groups


def auth_section(tmp: Path, **extra: Any) -> dict[str, Any]:
    users, groups = auth_files(tmp)
    return {
        "signing_secret": SECRET,
        "users_file": str(users),
        "groups_file": str(groups),
        "robots": {"ci": {"token_sha256": sha256(b"robot-token").removeprefix("sha256:"), "groups": ["team-a"]}},
        "rules": [
            {"names": ["xz", "public/**"], "pull": ["anonymous"]},
            {"names": ["numpy/scipy", "env/*"], "pull": ["group:team-a"]},
            {"names": ["**"], "pull": ["authenticated"]},
        ],
        "endpoints": {"builds": ["group:admins"]},
        "failed_logins": {"per_client": 5, "per_user": 8, "window": 60},
        **extra,
    }


@pytest.fixture
def authenticator(tmp_path: Path) -> Authenticator:
    return Authenticator(load_config(None, environ={}, auth=auth_section(tmp_path)).auth)


@pytest.fixture
async def client(aiohttp_client: Any, service: InTestService, store, authenticator: Authenticator) -> TestClient:  # noqa: F811
    return await aiohttp_client(create_app(service, store, auth=authenticator))


@pytest.fixture
def service(image) -> InTestService:  # noqa: F811
    return InTestService(image)


async def token_for(client: TestClient, scope: str, credentials: tuple[str, str] | None = ALICE) -> str:
    headers = basic(*credentials) if credentials else {}
    response = await client.get("/token", params={"service": "condery", "scope": scope}, headers=headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    return body["token"]


async def error_of(response, status: int, code: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    body = await response.json()
    assert [e["code"] for e in body["errors"]] == [code]
    return body["errors"][0]


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


# -- rules, pure ------------------------------------------------------------------------
@pytest.mark.parametrize(("glob", "name", "expected"), [
    ("**", "numpy/python", True),
    ("env/*", "env/0123abcd", True),
    ("env/*", "env/a/b", False),
    ("env/**", "env/a/b", True),
    ("envs/team-a", "envs/team-a", True),
    ("envs/team-a", "envs/team-ab", False),
    ("envs/team-?", "envs/team-b", True),
    ("numpy/*", "numpy", False),
    ("**/numpy", "numpy", True),
    ("**/numpy", "jupyter/numpy", True),
    ("a.b", "axb", False),  # a dot is a dot
])
def test_name_globs(glob: str, name: str, expected: bool) -> None:
    assert bool(glob_pattern(glob).fullmatch(name)) is expected


def test_principals_and_first_match_wins() -> None:
    alice = Identity("alice", "user", frozenset({"team-a"}))
    bob = Identity("bob", "user")
    assert matches(ANONYMOUS, ["anonymous"]) and not matches(ANONYMOUS, ["authenticated"])
    assert matches(bob, ["authenticated"]) and matches(bob, ["user:bob"]) and not matches(bob, ["group:team-a"])
    assert matches(alice, ["group:team-a"]) and not matches(ANONYMOUS, ["group:team-a", "user:"])
    assert not matches(alice, [])  # nobody
    policy = Policy([PullRule(("secret/**",), ("group:team-a",)), PullRule(("**",), ("anonymous",))], {})
    assert policy.may_pull(alice, "secret/x") and not policy.may_pull(bob, "secret/x")
    assert policy.may_pull(ANONYMOUS, "numpy")  # the second rule
    assert not Policy([PullRule(("env/*",), ("anonymous",))], {}).may_pull(alice, "numpy")  # no rule: nobody
    assert not policy.may_use(alice, "builds")  # an endpoint no right names: nobody


def test_channel_readers() -> None:
    from condery.config.schema import ChannelRule

    alice = Identity("alice", "user", frozenset({"team-a"}))
    policy = Policy([], {}, [ChannelRule("https://conda.example.org/private", ("group:team-a",))])
    channels = ("conda-forge", "https://conda.example.org/private")
    assert policy.readable_channels(alice, channels) == channels
    assert policy.readable_channels(ANONYMOUS, channels) == ("conda-forge",)
    assert policy.readable_channels(Identity("bob", "user"), channels) == ("conda-forge",)


def test_channel_rules_are_refused_until_the_builder_enforces_them() -> None:
    config = load_config(None, environ={}, channels=["conda-forge", "https://conda.example.org/private"],
                         auth={"signing_secret": SECRET, "channels": [
                             {"channel": "https://conda.example.org/private", "read": ["group:team-a"]}]})
    with pytest.raises(ConfigError, match=r"^auth.channels: channel rules are not enforced by this version's builder"):
        Authenticator(config.auth)
    auth = Authenticator(config.auth, channel_rules_enforced=True)
    assert auth.policy.readable_channels(ANONYMOUS, config.channels) == ("conda-forge",)


def test_scopes_parse_as_distribution_writes_them() -> None:
    assert [str(s) for s in parse_scopes(["repository:numpy/scipy:pull", "repository:a:pull,push b:c:d"])] == [
        "repository:numpy/scipy:pull", "repository:a:pull,push", "b:c:d"]
    with pytest.raises(ValueError):
        parse_scopes(["repository-numpy"])


# -- configuration -----------------------------------------------------------------------
def test_without_auth_nothing_changes() -> None:
    config = load_config(None, environ={})
    assert config.auth is None
    assert "auth: null" in effective_yaml(config)


@pytest.mark.parametrize(("section", "line"), [
    ({}, "auth.signing_key_file: required: a PEM private key"),
    ({"signing_secret": "short"}, "auth.signing_secret: an HS256 secret of at least 32 characters, got 5"),
    ({"signing_secret": SECRET, "signing_key_file": "/etc/hostname"},
     "auth.signing_secret: give either signing_key_file or signing_secret, not both"),
    ({"signing_secret": SECRET, "users_file": "/nonexistent/htpasswd"},
     "auth.users_file: '/nonexistent/htpasswd' is not a file"),
    ({"signing_secret": SECRET, "rules": []}, "auth.rules: expected a non-empty list"),
    ({"signing_secret": SECRET, "rules": [{"names": ["Numpy"], "pull": ["anonymous"]}]},
     "auth.rules[0].names[0]: expected a glob on canonical names"),
    ({"signing_secret": SECRET, "rules": [{"names": ["**"], "pull": ["everyone"]}]},
     "auth.rules[0].pull[0]: expected anonymous, authenticated, user:NAME or group:NAME, got 'everyone'"),
    ({"signing_secret": SECRET, "rules": [{"names": ["**"]}]}, "auth.rules[0].pull: required"),
    ({"signing_secret": SECRET, "endpoints": {"bulids": ["authenticated"]}},
     "auth.endpoints.bulids: unknown key (did you mean builds?)"),
    ({"signing_secret": SECRET, "robots": {"ci": {"token_sha256": "the-token-itself"}}},
     "auth.robots.ci.token_sha256: expected the 64 lowercase hex digits of the token's sha256"),
    ({"signing_secret": SECRET, "oidc": {"issuer": "https://sso.example.org", "audience": "condery"}},
     "auth.oidc.jwks_url: required"),
    ({"signing_secret": SECRET, "oidc": {"issuer": "https://i", "jwks_url": "https://i/k", "audience": "a",
                                         "algorithms": ["HS256"]}},
     "auth.oidc.algorithms: 'HS256' is not an asymmetric JWS algorithm"),
    ({"signing_secret": SECRET, "channels": [{"channel": "https://other.example.org/c", "read": ["anonymous"]}]},
     "auth.channels[0].channel: 'https://other.example.org/c' is not one of the configured channels"),
    ({"signing_secret": SECRET, "failed_logins": {"per_client": 0}},
     "auth.failed_logins.per_client: 0 is out of range (at least 1)"),
    ({"signing_secret": SECRET, "leeway": "30s"}, "auth.leeway: expected an integer, got '30s'"),
    ({"signing_secret": SECRET, "realm": "token"}, "auth.realm: expected an http(s):// URL"),
    ({"signin_secret": SECRET}, "auth.signin_secret: unknown key (did you mean signing_secret?)"),
])
def test_bad_auth_sections_are_one_line_each(section: dict[str, Any], line: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={}, auth=section)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines


def test_the_auth_section_from_the_environment_and_masked_output(tmp_path: Path) -> None:
    config = load_config(None, environ={"CONDERY_AUTH": json.dumps(auth_section(tmp_path))})
    assert config.auth is not None and config.auth.endpoints["builds"] == ("group:admins",)
    text = effective_yaml(config)
    assert SECRET not in text and "signing_secret: '***'" in text and "token_ttl: 300" in text
    assert "auth.signing_secret" in text.splitlines()[1]  # the header names what was masked


@pytest.mark.parametrize(("content", "line"), [
    ("alice:$apr1$xyz$abcdefghijklmnopqrstuv\n", "auth.users_file: line 1: user 'alice' has MD5 ($apr1$); "
                                                  "condery takes bcrypt only (htpasswd -B)"),
    ("# team\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "auth.users_file: line 2: user 'bob' has SHA-1 ({SHA})"),
    ("carol:plain\n", "auth.users_file: line 1: user 'carol' has a non-bcrypt hash"),
    ("dave\n", "auth.users_file: line 1: expected user:hash (htpasswd -B)"),
    ("erin:$2y$05$short\n", "auth.users_file: line 1: user 'erin' has a malformed bcrypt hash"),
])
def test_htpasswd_takes_bcrypt_only(content: str, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_htpasswd("auth.users_file", content)
    assert str(info.value).startswith(line)


def test_groups_file() -> None:
    assert parse_groups("g", "a: [alice, bob]\nb: [alice]\nempty:\n") == {
        "alice": frozenset({"a", "b"}), "bob": frozenset({"a"})}
    with pytest.raises(ConfigError, match="g: group 'a': expected a list of user names"):
        parse_groups("g", "a: alice\n")


def test_a_bad_key_file_stops_the_start(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    config = load_config(None, environ={}, auth={"signing_key_file": str(key)})
    with pytest.raises(ConfigError, match=r"^auth.signing_key_file: not a PEM private key$"):
        Authenticator(config.auth)


# -- the token flow over HTTP -----------------------------------------------------------
async def test_anonymous_gets_the_challenge_and_nothing_is_built(client: TestClient, service: InTestService) -> None:
    response = await client.get("/v2/")
    await error_of(response, 401, "UNAUTHORIZED")
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="http://127.0.0.1:') and challenge.endswith('/token",service="condery"')
    response = await client.get("/v2/scipy/numpy/manifests/latest")
    error = await error_of(response, 401, "UNAUTHORIZED")
    assert error["detail"] == [{"Type": "repository", "Name": "scipy/numpy", "Action": "pull"}]
    assert response.headers["WWW-Authenticate"].endswith(',service="condery",scope="repository:scipy/numpy:pull"')
    blob = sha256(service.image.layer)
    for path in (f"/v2/scipy/numpy/blobs/{blob}", "/v2/scipy/numpy/tags/list",
                 "/api/v1/images/numpy/scipy/latest", "/api/v1/images/numpy/scipy/latest/environment.yml",
                 "/images/numpy/scipy/latest", f"/v2/scipy/numpy/manifests/{sha256(service.image.oci)}"):
        response = await client.get(path)
        assert response.status == 401, path
    assert service.resolved == []


async def test_public_names_need_no_credentials(client: TestClient, service: InTestService) -> None:
    assert (await client.get("/v2/xz/manifests/latest")).status == 200
    assert (await client.get(f"/v2/xz/blobs/{sha256(service.image.layer)}")).status == 200
    assert (await client.get("/healthz")).status == 200 and (await client.get("/readyz")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_token_then_pull(client: TestClient, service: InTestService) -> None:
    token = await token_for(client, "repository:scipy/numpy:pull")
    claims = claims_of(token)
    assert claims["access"] == [{"type": "repository", "name": "scipy/numpy", "actions": ["pull"]}]
    assert claims["sub"] == "alice" and claims["aud"] == "condery" and claims["iss"] == "condery"
    assert jwt.get_unverified_header(token)["kid"]
    assert (await client.get("/v2/", headers=bearer(token))).status == 200
    response = await client.get("/v2/scipy/numpy/manifests/latest", headers=bearer(token))
    assert response.status == 200 and await response.read() == service.image.oci
    response = await client.get(f"/v2/scipy/numpy/blobs/{sha256(service.image.layer)}", headers=bearer(token))
    assert response.status == 200
    # several scopes in one request, as docker asks for a FROM and a push target
    response = await client.get("/token", headers=basic(*ALICE), params=[
        ("service", "condery"), ("scope", "repository:scipy/numpy:pull"), ("scope", "repository:python:pull,push"),
        ("account", "alice")])
    assert [a["name"] for a in claims_of((await response.json())["token"])["access"]] == ["scipy/numpy", "python"]


async def test_anonymous_token_grants_only_what_anonymous_may(client: TestClient) -> None:
    token = await token_for(client, "repository:xz:pull repository:scipy/numpy:pull", credentials=None)
    assert claims_of(token)["access"] == [{"type": "repository", "name": "xz", "actions": ["pull"]}]
    assert (await client.get("/v2/xz/manifests/latest", headers=bearer(token))).status == 200
    response = await client.get("/v2/scipy/numpy/manifests/latest", headers=bearer(token))
    await error_of(response, 401, "UNAUTHORIZED")


async def test_wrong_password_and_user_outside_the_group(client: TestClient, service: InTestService) -> None:
    response = await client.get("/token", params={"service": "condery", "scope": "repository:scipy/numpy:pull"},
                                headers=basic("alice", "wrong"))
    error = await error_of(response, 401, "UNAUTHORIZED")
    assert error["message"] == "wrong user name or password"
    assert (await client.get("/v2/", headers=basic("alice", "wrong"))).status == 401
    assert (await client.get("/v2/", headers=basic("nobody", "wrong"))).status == 401
    # bob logs in, but team-a's name is not his: his token holds no access, and a pull is 403
    token = await token_for(client, "repository:scipy/numpy:pull", credentials=BOB)
    assert claims_of(token)["access"] == []
    response = await client.get("/v2/scipy/numpy/manifests/latest", headers=bearer(token))
    assert (await error_of(response, 403, "DENIED"))["message"] == "bob may not pull numpy/scipy"
    await error_of(await client.get("/v2/numpy/scipy/manifests/latest", headers=basic(*BOB)), 403, "DENIED")
    # bob may pull any other name (the ** rule)
    assert (await client.get("/v2/python/manifests/latest", headers=basic(*BOB))).status == 200
    assert [r.canonical_name for r, _ in service.resolved] == ["python"]


async def test_basic_auth_directly_on_the_registry(client: TestClient) -> None:
    assert (await client.get("/v2/", headers=basic(*ALICE))).status == 200
    assert (await client.get("/v2/numpy/scipy/manifests/latest", headers=basic(*ALICE))).status == 200
    assert (await client.get("/v2/numpy/scipy/manifests/latest", headers=basic("ci", "robot-token"))).status == 200
    assert (await client.get("/v2/numpy/scipy/manifests/latest", headers=basic("ci", "robot-tokeN"))).status == 401
    response = await client.get("/v2/", headers={"Authorization": "Basic !!!"})
    await error_of(response, 401, "UNAUTHORIZED")
    await error_of(await client.get("/v2/", headers={"Authorization": "Digest x"}), 401, "UNAUTHORIZED")


async def test_oauth2_password_and_refresh_grants(client: TestClient, authenticator: Authenticator,
                                                  tmp_path: Path) -> None:
    form = {"grant_type": "password", "username": "alice", "password": ALICE[1], "service": "condery",
            "scope": "repository:scipy/numpy:pull", "client_id": "containerd-client", "access_type": "offline"}
    response = await client.post("/token", data=form)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert claims_of(body["access_token"])["access"][0]["name"] == "scipy/numpy"
    refresh = body["refresh_token"]
    assert claims_of(refresh)["use"] == "refresh" and "access" not in claims_of(refresh)
    # a refresh token is no access token, and an access token no refresh token
    response = await client.get("/v2/scipy/numpy/manifests/latest", headers=bearer(refresh))
    assert (await error_of(response, 401, "UNAUTHORIZED"))["message"] == "not an access token"
    bad = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": body["access_token"]})
    assert (await error_of(bad, 401, "UNAUTHORIZED"))["message"] == "not a refresh token"
    again = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh,
                                              "service": "condery", "scope": "repository:scipy/numpy:pull"})
    assert again.status == 200
    assert claims_of((await again.json())["access_token"])["sub"] == "alice"
    await error_of(await client.post("/token", data={**form, "password": "wrong"}), 401, "UNAUTHORIZED")
    await error_of(await client.post("/token", data={"grant_type": "client_credentials"}), 400, "UNSUPPORTED")
    # a new password ends the refresh tokens of the old one
    users = Path(authenticator.config.users_file)
    users.write_text(htpasswd_line("alice", "new-password") + "\n" + htpasswd_line(*BOB) + "\n")
    authenticator.logins.users._checked = 0  # the stat() is at most once a second: look now
    stale = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": refresh})
    assert "new password" in (await error_of(stale, 401, "UNAUTHORIZED"))["message"]
    assert (await client.get("/v2/", headers=basic("alice", "new-password"))).status == 200
    assert (await client.get("/v2/", headers=basic(*ALICE))).status == 401


async def test_token_requests_that_are_refused(client: TestClient) -> None:
    response = await client.get("/token", params={"service": "other", "scope": "repository:xz:pull"})
    assert "for service 'condery' only" in (await error_of(response, 401, "UNAUTHORIZED"))["message"]
    response = await client.get("/token", params={"service": "condery", "account": "bob"}, headers=basic(*ALICE))
    await error_of(response, 401, "UNAUTHORIZED")
    response = await client.get("/token", params={"scope": "nonsense"})
    await error_of(response, 400, "UNSUPPORTED")
    token = await token_for(client, "repository:xz:pull")
    # a token does not buy itself a successor
    await error_of(await client.get("/token", headers=bearer(token)), 401, "UNAUTHORIZED")


# -- tokens that must not verify ------------------------------------------------------------
async def test_tokens_that_do_not_verify_are_401(client: TestClient, authenticator: Authenticator,
                                                 service: InTestService) -> None:
    path = "/v2/scipy/numpy/manifests/latest"
    access = [{"type": "repository", "name": "scipy/numpy", "actions": ["pull"]}]
    alice = Identity("alice", "user", frozenset({"team-a"}))
    good = authenticator.tokens
    assert (await client.get(path, headers=bearer(good.issue(alice, access)))).status == 200

    def other(**kw: Any) -> Tokens:
        fields = {"keys": good.keys, "issuer": good.issuer, "service": good.service, "ttl": 300,
                  "refresh_ttl": 600, "leeway": 30, **kw}
        return Tokens(**fields)

    from condery.auth.tokens import SigningKeys

    other_key = SigningKeys(None, "another-secret-of-at-least-32-characters", 60)
    now = time.time()
    cases = {
        "expired": good.issue(alice, access, now=now - 300 - 31),  # past its ttl and the leeway
        "another key": other(keys=other_key).issue(alice, access),
        "another service": other(service="elsewhere").issue(alice, access),
        "another issuer": other(issuer="elsewhere").issue(alice, access),
        "not yet valid": good.issue(alice, access, now=now + 120),
        "alg none": jwt.encode({**claims_of(good.issue(alice, access))}, None, algorithm="none",
                               headers={"kid": good.keys.current().kid}),
        "garbage": "not.a.token",
        "tampered": good.issue(alice, [])[:-4] + "AAAA",
    }
    # alg none with our kid, written by hand as an attacker would (PyJWT's encoder adds nothing)
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": good.keys.current().kid,
                                                  "typ": "JWT"}).encode()).rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps(claims_of(good.issue(alice, access))).encode()).rstrip(b"=")
    cases["alg none by hand"] = f"{header}.{payload.decode()}."
    for what, token in cases.items():
        response = await client.get(path, headers=bearer(token))
        error = await error_of(response, 401, "UNAUTHORIZED")
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], what
        assert token not in json.dumps(error), what
    # within the leeway: a clock 20 s behind is tolerated
    assert (await client.get(path, headers=bearer(good.issue(alice, access, now=now - 300 - 20)))).status == 200
    assert (await client.get(path, headers=bearer(good.issue(alice, access, now=now + 20)))).status == 200
    # a token for another scope: 401 insufficient_scope (the client asks for the right one)
    response = await client.get("/v2/python/manifests/latest", headers=bearer(good.issue(alice, access)))
    await error_of(response, 401, "UNAUTHORIZED")
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    assert [r.canonical_name for r, _ in service.resolved] == ["numpy/scipy"] * 3


async def test_a_rotated_key_file(tmp_path: Path, aiohttp_client: Any, service: InTestService, store) -> None:  # noqa: F811
    def write_key(path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    key_file = tmp_path / "signing.pem"
    write_key(key_file)
    section = auth_section(tmp_path)
    del section["signing_secret"]
    auth = Authenticator(load_config(None, environ={}, auth={**section, "signing_key_file": str(key_file)}).auth)
    client = await aiohttp_client(create_app(service, store, auth=auth))
    first = await token_for(client, "repository:scipy/numpy:pull")
    assert jwt.get_unverified_header(first)["alg"] == "ES256"
    write_key(key_file)
    auth.tokens.keys._file._checked = 0  # the stat() is at most once a second: look now
    second = await token_for(client, "repository:scipy/numpy:pull")
    assert jwt.get_unverified_header(second)["kid"] != jwt.get_unverified_header(first)["kid"]
    for token in (first, second):  # the replaced key's tokens live out their time
        assert (await client.get("/v2/scipy/numpy/manifests/latest", headers=bearer(token))).status == 200


async def test_an_rsa_key_signs_rs256(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "rsa.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    auth = Authenticator(load_config(None, environ={}, auth={"signing_key_file": str(path)}).auth)
    token = auth.tokens.issue(ANONYMOUS, [])
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert auth.tokens.verify(token)["sub"] == ""


# -- endpoints ------------------------------------------------------------------------------
async def test_write_endpoints(client: TestClient) -> None:
    response = await client.post("/api/v1/builds", json={"name": "xz"})
    await error_of(response, 401, "UNAUTHORIZED")
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="condery"')
    await error_of(await client.post("/api/v1/builds", json={"name": "xz"}, headers=basic(*BOB)), 403, "DENIED")
    await error_of(await client.get("/api/v1/builds", headers=basic(*BOB)), 403, "DENIED")
    await error_of(await client.post("/api/v1/environments", data=b"x"), 401, "UNAUTHORIZED")
    await error_of(await client.get("/api/v1/environments"), 401, "UNAUTHORIZED")
    # the landing page stays open by default; static files and health always
    assert (await client.get("/api/v1/compose", params={"specs": "numpy"})).status == 200


async def test_the_access_log_names_the_user_and_holds_no_secret(client: TestClient, caplog) -> None:
    caplog.set_level(logging.INFO, logger="condery.access")
    token = await token_for(client, "repository:scipy/numpy:pull")
    await client.get("/v2/scipy/numpy/manifests/latest", headers=bearer(token))
    await client.get("/v2/", headers=basic("alice", "wrong-password-xyz"))
    fields = [getattr(r, FIELDS) for r in caplog.records]
    text = json.dumps(fields, default=str) + caplog.text
    assert token not in text and ALICE[1] not in text and "wrong-password-xyz" not in text
    assert [(f["path"], f["status"], f.get("user")) for f in fields] == [
        ("/token", 200, "alice"), ("/v2/scipy/numpy/manifests/latest", 200, "alice"), ("/v2/", 401, None)]


# -- failed logins --------------------------------------------------------------------------
def test_failed_logins_per_client_and_per_user() -> None:
    now = [1000.0]
    limits = FailedLogins(FailedLoginLimits(per_client=3, per_user=5, window=60), clock=lambda: now[0])
    for _ in range(3):
        assert limits.retry_after("10.0.0.1", "alice") is None
        limits.failed("10.0.0.1", "alice")
    assert limits.retry_after("10.0.0.1", "alice") == 60
    assert limits.retry_after("10.0.0.1", "bob") == 60  # the address is limited, whoever it names
    assert limits.retry_after("10.0.0.2", "bob") is None  # another client is served
    limits.failed("10.0.0.2", "alice")
    limits.failed("10.0.0.3", "alice")
    assert limits.retry_after("10.0.0.4", "alice") == 60  # five failures for alice from anywhere
    assert limits.retry_after("10.0.0.4", "bob") is None
    now[0] += 61
    assert limits.retry_after("10.0.0.1", "alice") is None


async def test_failed_logins_get_429_with_retry_after(client: TestClient, service: InTestService) -> None:
    statuses = []
    for _ in range(8):
        response = await client.get("/v2/", headers=basic("mallory", "guess"))
        statuses.append(response.status)
    assert statuses == [401] * 5 + [429] * 3
    error = await error_of(response, 429, "TOOMANYREQUESTS")
    assert 0 < int(response.headers["Retry-After"]) <= 60 and "too many failed logins" in error["message"]
    # the right password from this client waits too (its address is limited), anonymous pulls go on
    assert (await client.get("/token", headers=basic(*ALICE))).status == 429
    assert (await client.get("/v2/xz/manifests/latest")).status == 200


# -- OIDC ------------------------------------------------------------------------------------
@pytest.fixture
async def issuer(aiohttp_server: Any) -> dict[str, Any]:
    """An OIDC issuer stand-in: a JWKS on loopback, and its private key to sign with."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="sso-1", use="sig", alg="RS256")
    fetched = []

    async def jwks(request: web.Request) -> web.Response:
        fetched.append(time.time())
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}"
    return {"url": url, "jwks": f"{url}/jwks", "key": key, "fetched": fetched}


def oidc_token(issuer: dict[str, Any], **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": issuer["url"], "aud": "condery", "sub": "carol", "groups": ["team-a"], "iat": now,
            "exp": now + 300, **claims}
    return jwt.encode(body, issuer["key"], algorithm="RS256", headers={"kid": "sso-1"})


async def test_oidc_tokens(tmp_path: Path, issuer: dict[str, Any], aiohttp_client: Any, service: InTestService,
                           store) -> None:  # noqa: F811
    section = auth_section(tmp_path, oidc={"issuer": issuer["url"], "jwks_url": issuer["jwks"],
                                           "audience": "condery"})
    section["rules"].insert(0, {"names": ["python"], "pull": ["group:oidc:team-a"]})
    auth = Authenticator(load_config(None, environ={}, auth=section).auth)
    client = await aiohttp_client(create_app(service, store, auth=auth))
    path = "/v2/python/manifests/latest"
    # as a bearer token directly, and as the password of a login (docker login -u oidc -p $ID_TOKEN)
    assert (await client.get(path, headers=bearer(oidc_token(issuer)))).status == 200
    token = await token_for(client, "repository:python:pull", credentials=("oidc", oidc_token(issuer)))
    assert claims_of(token)["sub"] == "oidc:carol" and claims_of(token)["groups"] == ["oidc:team-a"]
    assert (await client.get(path, headers=bearer(token))).status == 200
    # carol's groups are the issuer's, prefixed: team-a of the groups file is not hers
    await error_of(await client.get("/v2/numpy/scipy/manifests/latest", headers=bearer(oidc_token(issuer))),
                   403, "DENIED")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = {
        "expired": oidc_token(issuer, exp=int(time.time()) - 100, iat=int(time.time()) - 400),
        "another audience": oidc_token(issuer, aud="someone-else"),
        "no sub": oidc_token(issuer, sub=""),
        "another key": jwt.encode({"iss": issuer["url"], "aud": "condery", "sub": "x", "iat": int(time.time()),
                                   "exp": int(time.time()) + 60}, other_key, algorithm="RS256",
                                  headers={"kid": "sso-1"}),
        "unknown kid": jwt.encode({"iss": issuer["url"], "aud": "condery", "sub": "x", "iat": int(time.time()),
                                   "exp": int(time.time()) + 60}, other_key, algorithm="RS256",
                                  headers={"kid": "sso-2"}),
        "HS256 with the public key": jwt.encode(
            {"iss": issuer["url"], "aud": "condery", "sub": "x", "iat": int(time.time()),
             "exp": int(time.time()) + 60}, "a-secret-a-secret-a-secret-a-secret", algorithm="HS256",
            headers={"kid": "sso-1"}),
    }
    for what, token in bad.items():
        response = await client.get(path, headers=bearer(token))
        assert response.status == 401, what
    assert len(issuer["fetched"]) <= 2  # one fetch, and one more for the unknown kid at most
    await auth.close()
