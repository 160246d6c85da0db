"""Tokens of an external OpenID Connect issuer (a company's SSO, a CI's ID tokens).

The issuer's JSON Web Key Set is fetched from `jwks_url` and kept for `jwks_cache`
seconds; a token whose `kid` is not in it makes one early fetch (a rotated key), at
most every 10 seconds, so a stream of forged `kid`s does not become a stream of fetches.
A token is accepted when its signature verifies with the key its `kid` names, with one
of `algorithms` (asymmetric only: `none` and HS* never), its `iss` is the issuer, its
`aud` holds the audience and it is within its lifetime (with `leeway`). The identity is
`username_prefix` + the `username_claim`, in the groups of `groups_claim` (each with
`groups_prefix`), as Kubernetes' API server maps OIDC users.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import jwt

from condery.auth.rules import Identity
from condery.auth.tokens import MAX_TOKEN, TokenInvalid
from condery.common.redact import redact_text
from condery.config.schema import OidcConfig

log = logging.getLogger("condery.auth")

_REFETCH_UNKNOWN_KID = 10.0  # seconds between fetches for a kid the set does not have
_MAX_JWKS_BYTES = 1 << 20
_FETCH_TIMEOUT = 10.0


def unverified_issuer(token: str) -> str | None:
    """The `iss` a token claims, unverified: only to pick who verifies it."""
    if len(token) > MAX_TOKEN:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


class OidcVerifier:
    def __init__(self, config: OidcConfig, leeway: int) -> None:
        self.config = config
        self.leeway = leeway
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched = 0.0  # time.monotonic() of the last successful fetch
        self._tried = 0.0  # of the last attempt
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self) -> None:
        self._tried = time.monotonic()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT))
        try:
            async with self._session.get(self.config.jwks_url) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                body = await response.content.read(_MAX_JWKS_BYTES + 1)
                if len(body) > _MAX_JWKS_BYTES:
                    raise ValueError("the key set is larger than 1 MiB")
            data = _json(body)
            keys = {}
            for item in data.get("keys", []) if isinstance(data, dict) else []:
                try:
                    key = jwt.PyJWK.from_dict(item)
                except jwt.PyJWTError:
                    continue  # a key of a type or use we cannot verify with: skip it
                if key.key_id:
                    keys[key.key_id] = key
            if not keys:
                raise ValueError("no usable key with a kid in the set")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            log.warning("auth: cannot fetch the OIDC key set %s: %s", redact_text(self.config.jwks_url),
                        redact_text(str(exc) or type(exc).__name__))
            return
        self._keys = keys
        self._fetched = time.monotonic()

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        async with self._lock:
            now = time.monotonic()
            stale = now - self._fetched > self.config.jwks_cache
            if (stale or kid not in self._keys) and now - self._tried > (1.0 if stale else _REFETCH_UNKNOWN_KID):
                await self._fetch()
        return self._keys.get(kid)

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid("not a token") from None
        kid, algorithm = header.get("kid"), header.get("alg")
        if algorithm not in self.config.algorithms:
            raise TokenInvalid(f"the OIDC token is signed with {str(algorithm)[:20]!r}, not one of "
                               f"{', '.join(self.config.algorithms)}")
        key = await self._key(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenInvalid("the OIDC token is signed with a key the issuer's key set does not have")
        try:
            claims = jwt.decode(token, key.key, algorithms=list(self.config.algorithms),
                                audience=self.config.audience, issuer=self.config.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iat", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("the OIDC token has expired") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid("the OIDC token is for another audience") from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"invalid OIDC token ({type(exc).__name__})") from None
        name = claims.get(self.config.username_claim)
        if not isinstance(name, str) or not name:
            raise TokenInvalid(f"the OIDC token has no {self.config.username_claim!r} claim")
        groups = claims.get(self.config.groups_claim) or []
        if isinstance(groups, str):
            groups = [groups]
        if not isinstance(groups, list):
            groups = []
        prefix = self.config.groups_prefix
        return Identity(name=self.config.username_prefix + name, kind="oidc",
                        groups=frozenset(prefix + g for g in groups if isinstance(g, str) and g))


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ValueError("the key set is not JSON") from None
