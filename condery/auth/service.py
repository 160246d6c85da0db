"""The Authenticator: credentials to an identity, token requests to tokens.

Built once at start from `auth:` (every file read then: a missing key or an unreadable
htpasswd stops `condery serve` with one line), then asked by the HTTP side (http.py).
"""

from __future__ import annotations

import hmac
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping

from condery.auth.identities import Logins
from condery.auth.oidc import OidcVerifier, unverified_issuer
from condery.auth.ratelimit import FailedLogins
from condery.auth.rules import ANONYMOUS, Identity, Policy
from condery.auth.tokens import ACCESS, REFRESH, Scope, SigningKeys, TokenInvalid, Tokens, identity_of
from condery.config.schema import AuthConfig, ConfigError
from condery.image.meta import MetaPackage
from condery.image.names import parse_environment_name, parse_name
from condery.oci.errors import RegistryError, TooManyRequests

log = logging.getLogger("condery.auth")


class LoginFailed(Exception):
    """Wrong user name or password (or robot token); the message never says which."""


def canonical_name(name: str, meta_packages: Mapping[str, MetaPackage]) -> str:
    """The canonical name rules are matched on (sorted, de-duplicated components), or
    `name` itself when it does not parse (the handler then answers its 400)."""
    try:
        if parse_environment_name(name) is not None:
            return name
        return parse_name(name, meta_packages).canonical_name
    except (RegistryError, ValueError):
        return name


class Authenticator:
    def __init__(self, config: AuthConfig, *, channel_rules_enforced: bool = False) -> None:
        """Reads every file `config` names; ConfigError (one line) when one is wrong.

        `channel_rules_enforced`: the builder solves each identity's names with only the
        channels it may read (Policy.readable_channels). Until a builder says so, channel
        rules are refused rather than silently not applied."""
        if config.channels and not channel_rules_enforced:
            raise ConfigError("auth.channels: channel rules are not enforced by this version's builder yet; "
                              "protect the names that need a private channel with auth.rules instead")
        self.config = config
        self.service = config.service
        self.policy = Policy(config.rules, config.endpoints, config.channels)
        self.logins = Logins(config.users_file, config.groups_file, config.robots)
        # A replaced key verifies the tokens it signed for as long as they may live.
        keys = SigningKeys(config.signing_key_file, config.signing_secret,
                           keep_retired=max(config.token_ttl, config.refresh_token_ttl) + config.leeway)
        self.tokens = Tokens(keys, config.issuer, config.service, config.token_ttl, config.refresh_token_ttl,
                             config.leeway)
        self.oidc = OidcVerifier(config.oidc, config.leeway) if config.oidc is not None else None
        self.failed_logins = FailedLogins(config.failed_logins)

    async def close(self) -> None:
        self.logins.close()
        if self.oidc is not None:
            await self.oidc.close()

    # -- who is asking ------------------------------------------------------------------
    async def login(self, user: str, password: str, client: str) -> Identity:
        """A user and password (a robot and its token, or any name and an OIDC token as
        the password: `docker login -u oidc -p $ID_TOKEN`) to an identity.

        Raises TooManyRequests past the failed-login limits, LoginFailed otherwise."""
        wait = self.failed_logins.retry_after(client, user)
        if wait is not None:
            raise TooManyRequests(f"too many failed logins; try again in {wait} s", retry_after=wait)
        identity = await self.logins.check(user, password)
        if identity is None and self.oidc is not None and unverified_issuer(password) == self.oidc.config.issuer:
            try:
                identity = await self.oidc.verify(password)
            except TokenInvalid:
                identity = None
        if identity is None:
            self.failed_logins.failed(client, user)
            raise LoginFailed("wrong user name or password")
        return identity

    async def bearer(self, token: str) -> tuple[Identity, dict[str, Any] | None]:
        """The identity of a bearer token, with its claims when it is one of ours (they
        hold the access it was granted); an OIDC token has none. Raises TokenInvalid."""
        if self.oidc is not None:
            issuer = unverified_issuer(token)
            if issuer == self.oidc.config.issuer and issuer != self.tokens.issuer:
                return await self.oidc.verify(token), None
        claims = self.tokens.verify(token, ACCESS)
        return identity_of(claims), claims

    async def refreshed(self, refresh_token: str) -> Identity:
        """The identity of a refresh token, as long as its login has not changed since."""
        claims = self.tokens.verify(refresh_token, REFRESH)
        name, kind = claims["sub"], claims.get("kind")
        if not name or kind not in ("user", "robot"):
            raise TokenInvalid("not a refresh token of a login")
        fingerprint = self.logins.user_fingerprint(name, kind)
        given = claims.get("fp")
        if fingerprint is None or not isinstance(given, str) or not hmac.compare_digest(fingerprint, given):
            raise TokenInvalid("the refresh token's login no longer exists or has a new password")
        return self.logins.identity(name, kind)

    # -- what it gets ---------------------------------------------------------------------
    def grant(self, identity: Identity, scopes: Iterable[Scope], canonical: Callable[[str], str]) -> list[dict[str, Any]]:
        """The `access` claim for the scopes asked: what the rules allow of them (pull only:
        condery has nothing to push); refused scopes are left out, as Distribution does."""
        granted: dict[tuple[str, str], list[str]] = {}
        for scope in scopes:
            if scope.type != "repository" or "pull" not in scope.actions:
                continue
            if self.policy.may_pull(identity, canonical(scope.name)):
                granted.setdefault((scope.type, scope.name), ["pull"])
        return [{"type": type, "name": name, "actions": actions} for (type, name), actions in granted.items()]

    def token_response(self, identity: Identity, access: list[dict[str, Any]], offline: bool) -> dict[str, Any]:
        """The token endpoint's answer, for docker's GET and OAuth2's POST alike."""
        now = time.time()
        token = self.tokens.issue(identity, access, now=now)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.tokens.ttl,
            "issued_at": datetime.fromtimestamp(int(now), timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        if offline and identity.kind in ("user", "robot"):
            fingerprint = self.logins.user_fingerprint(identity.name, identity.kind)
            body["refresh_token"] = self.tokens.issue(identity, [], use=REFRESH, fingerprint=fingerprint, now=now)
        return body


__all__ = ["ANONYMOUS", "Authenticator", "LoginFailed", "canonical_name"]
