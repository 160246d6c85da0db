"""The tokens condery signs: short-lived JWTs bound to a service and to scopes.

An access token's claims are Distribution's (docker/distribution `registry/auth/token`):
`iss`, `sub` (the user; empty for anonymous), `aud` (the service), `exp`, `nbf`, `iat`,
`jti`, and `access`: `[{"type": "repository", "name": NAME, "actions": ["pull"]}]`; plus
condery's `use` (`access` or `refresh`), `kind` and `groups` of the identity. The header
names the signing key by `kid`, so keys can rotate: the key file is reread when it
changes, new tokens are signed with the new key, and tokens of the key it replaced are
still accepted for as long as they can live (a refresh token signed by it ends then:
its client logs in again).

Keys: a PEM private key file (RSA: RS256, EC P-256/P-384: ES256/ES384, Ed25519:
EdDSA), or an HS256 secret. A token is accepted only with the algorithm of the key its
`kid` names (`alg: none` and algorithm confusion never verify), for this issuer and
service, within its lifetime give or take `leeway` seconds of clock skew.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from condery.auth.identities import ReloadingFile
from condery.auth.rules import Identity
from condery.config.schema import ConfigError

log = logging.getLogger("condery.auth")

ACCESS, REFRESH = "access", "refresh"
MAX_TOKEN = 8192  # characters: longer Authorization values are refused unread


class TokenInvalid(Exception):
    """A token that does not verify; the message says why (no token text in it)."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: Any  # what jwt.encode signs with
    public: Any  # what jwt.decode verifies with


def _kid(material: bytes) -> str:
    return hashlib.sha256(material).hexdigest()[:16]


def key_from_secret(secret: str) -> SigningKey:
    raw = secret.encode()
    return SigningKey(_kid(b"hs256:" + raw), "HS256", raw, raw)


def key_from_pem(key: str, text: str) -> SigningKey:
    """A PEM private key -> the signing key and its algorithm; ConfigError if it is none of ours."""
    try:
        private = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        # TypeError: a password is needed (cryptography's word for an encrypted key).
        reason = "an encrypted key (give it unencrypted: openssl pkey -in KEY -out KEY.plain)" \
            if "ENCRYPTED" in text else "not a PEM private key"
        raise ConfigError(f"{key}: {reason}") from None
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise ConfigError(f"{key}: an RSA key of {private.key_size} bits; at least 2048")
        algorithm = "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        algorithm = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}.get(private.curve.name, "")
        if not algorithm:
            raise ConfigError(f"{key}: an EC key on {private.curve.name}; use P-256, P-384 or P-521")
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        algorithm = "EdDSA"
    else:
        raise ConfigError(f"{key}: a {type(private).__name__}; use an RSA, EC or Ed25519 key")
    public = private.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return SigningKey(_kid(der), algorithm, private, public)


class SigningKeys:
    """The current signing key, and the keys it replaced while their tokens may live."""

    def __init__(self, key_file: str | None, secret: str | None, keep_retired: float) -> None:
        self._file = ReloadingFile("auth.signing_key_file", key_file, key_from_pem) if key_file else None
        self._static = key_from_secret(secret) if secret else None
        if self._file is None and self._static is None:
            raise ConfigError("auth.signing_key_file: required (or auth.signing_secret)")
        self._keep = keep_retired
        self._lock = threading.Lock()
        self._current = self._load()
        self._retired: dict[str, tuple[SigningKey, float]] = {}

    def _load(self) -> SigningKey:
        return self._file.current() if self._file is not None else self._static  # type: ignore[return-value]

    def current(self) -> SigningKey:
        key = self._load()
        if key.kid != self._current.kid:
            with self._lock:
                if key.kid != self._current.kid:
                    log.info("auth: signing key rotated (kid %s -> %s)", self._current.kid, key.kid)
                    self._retired[self._current.kid] = (self._current, time.monotonic() + self._keep)
                    self._current = key
        return self._current

    def verifying(self, kid: str) -> SigningKey | None:
        current = self.current()
        if kid == current.kid:
            return current
        retired = self._retired.get(kid)
        if retired is None:
            return None
        if retired[1] < time.monotonic():
            self._retired.pop(kid, None)
            return None
        return retired[0]


@dataclass(frozen=True)
class Scope:
    type: str
    name: str
    actions: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    """`repository:NAME:pull[,push]` items (several per value, space-separated, as OAuth2
    writes them); ValueError for one that is not TYPE:NAME:ACTIONS."""
    scopes = []
    for value in values:
        for item in value.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if not kind or not name or not actions:
                raise ValueError(f"scope {item[:120]!r} is not TYPE:NAME:ACTIONS")
            scopes.append(Scope(kind, name, tuple(a for a in actions.split(",") if a)))
    return scopes


class Tokens:
    """Issues and verifies condery's own tokens."""

    def __init__(self, keys: SigningKeys, issuer: str, service: str, ttl: int, refresh_ttl: int,
                 leeway: int) -> None:
        self.keys, self.issuer, self.service = keys, issuer, service
        self.ttl, self.refresh_ttl, self.leeway = ttl, refresh_ttl, leeway

    def issue(self, identity: Identity, access: list[dict[str, Any]], *, use: str = ACCESS,
              fingerprint: str | None = None, now: float | None = None) -> str:
        now = int(time.time() if now is None else now)
        key = self.keys.current()
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": identity.name,
            "aud": self.service,
            "exp": now + (self.ttl if use == ACCESS else self.refresh_ttl),
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "use": use,
            "kind": identity.kind,
        }
        if use == ACCESS:
            claims["groups"] = sorted(identity.groups)
            claims["access"] = access
        if fingerprint is not None:
            claims["fp"] = fingerprint
        return jwt.encode(claims, key.private, algorithm=key.algorithm, headers={"kid": key.kid})

    def verify(self, token: str, use: str = ACCESS) -> dict[str, Any]:
        """The claims of a token of ours; TokenInvalid (with the reason) otherwise."""
        if len(token) > MAX_TOKEN:
            raise TokenInvalid("the token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid("not a token") from None
        kid = header.get("kid")
        key = self.keys.verifying(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenInvalid("the token is signed with a key this registry does not know")
        if header.get("alg") != key.algorithm:
            raise TokenInvalid(f"the token is not signed with {key.algorithm}")
        try:
            claims = jwt.decode(
                token, key.public, algorithms=[key.algorithm], audience=self.service, issuer=self.issuer,
                leeway=self.leeway, options={"require": ["exp", "iat", "nbf", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenInvalid("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise TokenInvalid("the token is for another service") from None
        except jwt.InvalidIssuerError:
            raise TokenInvalid("the token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenInvalid("the token's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"invalid token ({type(exc).__name__})") from None
        if claims.get("use") != use:
            raise TokenInvalid(f"not an {use} token" if use == ACCESS else f"not a {use} token")
        if not isinstance(claims.get("sub"), str):
            raise TokenInvalid("invalid token (sub)")
        return claims


def identity_of(claims: dict[str, Any]) -> Identity:
    """The identity an access token of ours was issued to."""
    groups = claims.get("groups") or []
    kind = claims.get("kind") if isinstance(claims.get("kind"), str) else "anonymous"
    if not claims.get("sub"):
        kind = "anonymous"
    return Identity(name=claims["sub"], kind=kind,
                    groups=frozenset(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else frozenset())


def granted(claims: dict[str, Any], type: str, name: str, action: str) -> bool:
    """Whether an access token's `access` claim holds `action` on `type:name`."""
    access = claims.get("access")
    if not isinstance(access, list):
        return False
    for entry in access:
        if (isinstance(entry, dict) and entry.get("type") == type and entry.get("name") == name
                and isinstance(entry.get("actions"), list) and action in entry["actions"]):
            return True
    return False
