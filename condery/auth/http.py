"""The HTTP side of auth: the middleware that guards every route, and `/token`.

What each request needs (`classify`):

    /healthz /readyz /static/... /token               open, always
    GET /v2/                                           any valid credentials or token (the ping
                                                       clients send before and after login)
    /v2/<name>/manifests|blobs|tags|referrers/...      the pull rule of <name>'s canonical name
    /api/v1/images/<name>/<tag>[/file], /images/...    the same
    GET /api/v1/builds/<id>                            the pull rule of that build's name
    POST /api/v1/builds, GET /api/v1/builds            endpoint `builds`
    POST /api/v1/environments                          endpoint `environments`
    GET /api/v1/environments                           endpoint `environment_list`
    /metrics                                           endpoint `metrics`
    anything else (/, /api/v1/compose, 404s)           endpoint `landing`

A request without the right gets `401 UNAUTHORIZED` when it came without credentials
(or with a token that does not verify, or one not granted this scope), with the
challenge of the distribution spec under /v2/ (`WWW-Authenticate: Bearer realm=...,
service=...,scope="repository:<name>:pull"`) and a Basic one elsewhere (browsers, curl);
`403 DENIED` when its credentials are good but the rules say no. Either way the handler
never runs: nothing is solved or built. Failed logins past the limits get `429
TOOMANYREQUESTS` with `Retry-After`.

The access log names the user (`USER_KEY`); no password, token or Authorization value
is ever put in a log line or an error body.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Collection, Mapping, Sequence

from aiohttp import hdrs, web

from condery.auth.rules import ANONYMOUS, Identity
from condery.auth.service import Authenticator, LoginFailed, canonical_name
from condery.auth.tokens import TokenInvalid, granted, parse_scopes
from condery.image.meta import MetaPackage
from condery.oci.errors import Denied, RegistryError, Unauthorized

USER_KEY = web.RequestKey("condery_user", str) if hasattr(web, "RequestKey") else "condery_user"
# The configured channels this request's identity may read, where channel rules exist
# (absent: every channel). The builder solves the request's names with only these.
CHANNELS_KEY = web.RequestKey("condery_channels", tuple) if hasattr(web, "RequestKey") else "condery_channels"
# Whether this request's identity may pull a canonical name (absent without auth: yes):
# for what the middleware cannot see from the path (a build's name in its body, the
# landing page's lists of builds and failures).
MAY_PULL_KEY = web.RequestKey("condery_may_pull", object) if hasattr(web, "RequestKey") else "condery_may_pull"
_TOKEN_FORM_LIMIT = 64 * 1024

_V2_NAME = re.compile(
    r"/v2/(?P<name>.+?)/(?:manifests/[^/]+|blobs/uploads(?:/[^/]*)?|blobs/[^/]+|tags/list|referrers/[^/]+)"
)
_IMAGES = re.compile(r"/(?:api/v1/)?images/(?P<tail>.+)")
_BUILD = re.compile(r"/api/v1/builds/(?P<id>[^/]+)")
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_OPEN = frozenset({"/healthz", "/readyz", "/token"})
_ENDPOINTS = {
    ("POST", "/api/v1/builds"): "builds",
    ("GET", "/api/v1/builds"): "builds",
    ("HEAD", "/api/v1/builds"): "builds",
    ("POST", "/api/v1/environments"): "environments",
    ("GET", "/api/v1/environments"): "environment_list",
    ("HEAD", "/api/v1/environments"): "environment_list",
}


class AuthError(RegistryError):
    """A registry error answered with extra headers (the challenge, for a 401)."""

    def __init__(self, error: RegistryError, headers: Mapping[str, str]) -> None:
        super().__init__(error.message, error.detail, code=error.code, status=error.status,
                         retry_after=error.retry_after)
        self.headers = dict(headers)


@dataclass(frozen=True)
class Need:
    """What a request needs: `open`, `base` (/v2/), `pull` (a name) or `endpoint`."""

    kind: str
    name: str = ""  # pull: as in the path (what a token's scope names)
    canonical: str = ""  # pull: what the rules match
    endpoint: str = ""

    @property
    def registry(self) -> bool:
        """Under /v2/: the challenge is the distribution spec's Bearer one."""
        return self.kind == "base" or (self.kind == "pull" and not self.endpoint)


def classify(method: str, path: str, canonical: Callable[[str], str], files: Collection[str],
             build_name: Callable[[str], str | None]) -> Need:
    if path in _OPEN or path.startswith("/static/"):
        return Need("open")
    if path in ("/v2", "/v2/"):
        return Need("base")
    if path.startswith("/v2/"):
        match = _V2_NAME.fullmatch(path)
        if match is None:
            return Need("base")  # no name in it: the handler answers 404 NAME_UNKNOWN to a valid login
        name = match.group("name")
        return Need("pull", name, canonical(name))
    if path == "/metrics":
        return Need("endpoint", endpoint="metrics")
    endpoint = _ENDPOINTS.get((method, path.rstrip("/")))
    if endpoint is not None:
        return Need("endpoint", endpoint=endpoint)
    match = _IMAGES.fullmatch(path)
    if match is not None:
        tail = match.group("tail")
        head, _, last = tail.rpartition("/")
        if last in files and head.count("/") >= 1:
            tail = head
        name = tail.rpartition("/")[0] or tail
        return Need("pull", name, canonical(name), endpoint="images")
    match = _BUILD.fullmatch(path)
    if match is not None and method in ("GET", "HEAD"):
        name = build_name(match.group("id"))
        return Need("open") if name is None else Need("pull", name, name, endpoint="builds")
    return Need("endpoint", endpoint="landing")


def realm_of(auth: Authenticator, request: web.Request) -> str:
    """The token endpoint's URL: configured, else this request's scheme and host + /token."""
    if auth.config.realm:
        return auth.config.realm
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    scheme = proto if proto in ("http", "https") else request.scheme
    host = request.headers.get(hdrs.HOST, "")
    if not _HOST.fullmatch(host):
        host = "localhost"
    return f"{scheme}://{host}/token"


def _challenge(auth: Authenticator, request: web.Request, need: Need, error: str | None = None) -> dict[str, str]:
    if not need.registry:
        return {hdrs.WWW_AUTHENTICATE: f'Basic realm="{auth.service}", charset="UTF-8"'}
    parts = [f'realm="{realm_of(auth, request)}"', f'service="{auth.service}"']
    if need.kind == "pull":
        parts.append(f'scope="repository:{need.name}:pull"')
    if error:
        parts.append(f'error="{error}"')
    return {hdrs.WWW_AUTHENTICATE: "Bearer " + ",".join(parts)}


def _detail(need: Need) -> Any:
    if need.kind == "pull":
        return [{"Type": "repository", "Name": need.name, "Action": "pull"}]
    return None


def _basic(value: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8", "surrogateescape")
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


async def identify(auth: Authenticator, request: web.Request, need: Need) -> tuple[Identity, dict[str, Any] | None, bool]:
    """(identity, claims of our own token or None, whether credentials came) of a request.

    Raises the 401 (with its challenge) for credentials or a token that do not verify,
    and the 429 past the failed-login limits."""
    header = request.headers.get(hdrs.AUTHORIZATION)
    if not header:
        return ANONYMOUS, None, False
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        credentials = _basic(value)
        if credentials is None:
            raise AuthError(Unauthorized("malformed Basic credentials", _detail(need)), _challenge(auth, request, need))
        try:
            identity = await auth.login(credentials[0], credentials[1], request.remote or "unknown")
        except LoginFailed as exc:
            raise AuthError(Unauthorized(str(exc), _detail(need)), _challenge(auth, request, need)) from None
        return identity, None, True
    if scheme == "bearer":
        try:
            identity, claims = await auth.bearer(value.strip())
        except TokenInvalid as exc:
            raise AuthError(Unauthorized(str(exc), _detail(need)),
                            _challenge(auth, request, need, "invalid_token")) from None
        return identity, claims, True
    raise AuthError(Unauthorized("expected Basic or Bearer credentials", _detail(need)), _challenge(auth, request, need))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def auth_middleware(auth: Authenticator, meta_packages: Callable[[], Mapping[str, MetaPackage]],
                    files: Collection[str], build_name: Callable[[str], str | None],
                    channels: Callable[[], Sequence[str]] = tuple) -> Any:
    """The middleware guarding every route (see the module's table). `meta_packages` gives
    what names may use (for canonical names), `files` the read-back file names under
    /api/v1/images/<name>/<tag>/, `build_name` a build id's canonical name (None: unknown),
    `channels` the configured channels (those the identity may read go to CHANNELS_KEY)."""

    def canonical(name: str) -> str:
        return canonical_name(name, meta_packages())

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        need = classify(request.method, request.path, canonical, files, build_name)
        if need.kind == "open":
            return await handler(request)
        identity, claims, presented = await identify(auth, request, need)
        if identity.authenticated:
            request[USER_KEY] = identity.name
        if auth.policy.channels:
            request[CHANNELS_KEY] = auth.policy.readable_channels(identity, channels())
        request[MAY_PULL_KEY] = lambda name: auth.policy.may_pull(identity, name)
        if need.kind == "base":
            if not presented:
                raise AuthError(Unauthorized("authentication required"), _challenge(auth, request, need))
            return await handler(request)
        if need.kind == "pull":
            allowed = auth.policy.may_pull(identity, need.canonical)
            bound = claims is None or any(granted(claims, "repository", name, "pull")
                                          for name in (need.name, need.canonical))
            if allowed and bound:
                return await handler(request)
            if not allowed and identity.authenticated:
                raise Denied(f"{identity.name} may not pull {need.canonical}", _detail(need))
            error = "insufficient_scope" if claims is not None else None
            message = (f"the token does not grant pull of {need.name}" if claims is not None and allowed
                       else f"authentication required to pull {need.canonical}")
            raise AuthError(Unauthorized(message, _detail(need)), _challenge(auth, request, need, error))
        if auth.policy.may_use(identity, need.endpoint):
            return await handler(request)
        if identity.authenticated:
            raise Denied(f"{identity.name} may not use {request.method} {request.path[:80]}")
        raise AuthError(Unauthorized(f"authentication required for {request.method} {request.path[:80]}"),
                        _challenge(auth, request, need))

    return middleware


def token_handler(auth: Authenticator, meta_packages: Callable[[], Mapping[str, MetaPackage]]) -> Handler:
    """`GET /token` (docker: Basic auth or none, `service`, `scope`..., `account`,
    `offline_token`) and `POST /token` (OAuth2 forms as containerd and docker login send
    them: `grant_type=password` with `username`/`password`, or `refresh_token`)."""
    token_need = Need("endpoint", endpoint="token")

    def canonical(name: str) -> str:
        return canonical_name(name, meta_packages())

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == hdrs.METH_POST:
            if request.content_length is not None and request.content_length > _TOKEN_FORM_LIMIT:
                raise RegistryError("the token request is too large", code="UNSUPPORTED", status=413)
            form = await request.post()
            fields = {key: str(form.get(key, "")) for key in
                      ("grant_type", "service", "scope", "username", "password", "refresh_token", "access_type")}
            scopes_text = [fields["scope"]]
            service, account = fields["service"], ""
            offline = True
            if fields["grant_type"] == "password":
                try:
                    identity = await auth.login(fields["username"], fields["password"], request.remote or "unknown")
                except LoginFailed as exc:
                    raise AuthError(Unauthorized(str(exc)), _challenge(auth, request, token_need)) from None
            elif fields["grant_type"] == "refresh_token":
                offline = False
                try:
                    identity = await auth.refreshed(fields["refresh_token"])
                except TokenInvalid as exc:
                    raise AuthError(Unauthorized(str(exc)), _challenge(auth, request, token_need)) from None
            else:
                raise RegistryError(f"grant_type {fields['grant_type'][:40]!r} is not supported: password or "
                                    "refresh_token", code="UNSUPPORTED", status=400)
        elif request.method in (hdrs.METH_GET, hdrs.METH_HEAD):
            scopes_text = request.query.getall("scope", [])
            service, account = request.query.get("service", ""), request.query.get("account", "")
            offline = request.query.get("offline_token", "").lower() == "true"
            if request.headers.get(hdrs.AUTHORIZATION, "").strip().lower().startswith("bearer"):
                # A token is not a login: it must not buy itself a successor.
                raise AuthError(Unauthorized("expected Basic credentials"), _challenge(auth, request, token_need))
            identity, _, _ = await identify(auth, request, token_need)
        else:
            raise RegistryError(f"{request.method} /token is not supported", code="UNSUPPORTED", status=405)
        if service and service != auth.service:
            raise AuthError(Unauthorized(f"this token server issues tokens for service {auth.service!r} only"),
                            _challenge(auth, request, token_need))
        if account and identity.authenticated and account != identity.name:
            raise AuthError(Unauthorized("account does not match the credentials"), _challenge(auth, request, token_need))
        try:
            scopes = parse_scopes(scopes_text)
        except ValueError as exc:
            raise RegistryError(str(exc), code="UNSUPPORTED", status=400) from None
        if identity.authenticated:
            request[USER_KEY] = identity.name
        access = auth.grant(identity, scopes, canonical)
        body = auth.token_response(identity, access, offline)
        return web.json_response(body, headers={hdrs.CACHE_CONTROL: "no-store", hdrs.PRAGMA: "no-cache"})

    return handler
