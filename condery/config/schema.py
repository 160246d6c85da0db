"""The configuration's shape: one frozen dataclass per section, with the embedded
defaults. Reading and checking a file is load.py; writing one back is output.py."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from condery.image.meta import DEFAULT_META_PACKAGES, MetaPackage
from condery.layers.compression import GZIP

# debian:bookworm-slim's multi-platform index, pinned so that the default image is
# reproducible; bump it on purpose (and say so in the changelog).
# Digest source: Renovate's digest bump for debian:bookworm-slim in
# https://github.com/MathiasPius/kronform/pull/323 (df52e55 -> 8820086) and
# https://github.com/void-community/Void/pull/1411, full value as pinned in public
# Dockerfiles (e.g. `FROM debian:bookworm-slim@sha256:88200866...`), one of which notes it
# is the OCI index digest (debian:bookworm-20260824-slim). Not re-checked against Docker
# Hub from this machine (no access): verify with `skopeo inspect --raw` when bumping.
DEFAULT_BASE_IMAGE = (
    "docker.io/library/debian:bookworm-slim"
    "@sha256:88200866dfff7ea7f5cbcb6ec7c8a701889efe6fe859fe64d6990e4b07ea4171"
)


class ConfigError(ValueError):
    """A configuration value is missing, malformed or contradictory."""


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "filesystem"  # "filesystem" or "s3"
    path: str = "condery-data"  # filesystem: the store's root directory
    bucket: str | None = None  # s3
    endpoint_url: str | None = None
    region: str | None = None
    redirect: bool = False  # s3: answer blob GETs with a 307 to a presigned URL


@dataclass(frozen=True)
class CoordinationConfig:
    """How replicas on one bucket avoid building the same image twice (coordination.py)."""

    backend: str = "local"  # "local" (one replica) or "redis"
    url: str | None = None  # redis: redis://HOST:PORT/DB (or rediss://, unix://)
    lease: int = 30  # redis: seconds a killed builder can keep others waiting on its image


@dataclass(frozen=True)
class GcConfig:
    """`condery gc` (condery/records/gc.py): how long what nothing current reaches is kept."""

    keep: int = 7 * 24 * 3600  # seconds an image replaced as `latest` (or of another configuration) stays
    grace: int = 24 * 3600  # seconds: nothing younger is removed, nothing served within it either
    snapshots_max_age: int | None = None  # seconds a date tag unused stays; None: forever
    interval: int = 0  # seconds between runs inside `condery serve`; 0: only `condery gc`


# Who may pull what (condery/auth/): principals are `anonymous` (anyone, with or without
# credentials), `authenticated` (any login), `user:NAME` (htpasswd user, robot, or OIDC
# user with its prefix) and `group:NAME`.
ENDPOINTS = ("builds", "environments", "environment_list", "metrics", "landing")
DEFAULT_ENDPOINT_RIGHTS: Mapping[str, tuple[str, ...]] = {
    "builds": ("authenticated",),  # POST /api/v1/builds, GET /api/v1/builds (lists every name)
    "environments": ("authenticated",),  # POST /api/v1/environments
    "environment_list": ("authenticated",),  # GET /api/v1/environments
    "metrics": ("anonymous",),  # GET /metrics (route labels, never names)
    "landing": ("anonymous",),  # /, /api/v1/compose and any other page outside /v2/ and the APIs
}


@dataclass(frozen=True)
class PullRule:
    """Names matching one of `names` (globs on the canonical name) may be pulled by `pull`."""

    names: tuple[str, ...]
    pull: tuple[str, ...]


@dataclass(frozen=True)
class ChannelRule:
    """Packages of `channel` may reach only the images of those in `read`."""

    channel: str
    read: tuple[str, ...]


@dataclass(frozen=True)
class RobotAccount:
    """A static token for CI or a Kubernetes imagePullSecret, kept as its sha256 only."""

    token_sha256: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class OidcConfig:
    """Tokens of an external OpenID Connect issuer, checked against its JWKS."""

    issuer: str
    jwks_url: str
    audience: str
    username_claim: str = "sub"
    groups_claim: str = "groups"
    # As Kubernetes' --oidc-username-prefix: the issuer's names are not the htpasswd file's.
    username_prefix: str = "oidc:"
    groups_prefix: str = "oidc:"
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    jwks_cache: int = 300  # seconds the key set is used before it is fetched again


@dataclass(frozen=True)
class FailedLoginLimits:
    """Failed logins allowed within `window` seconds, per client address and per user name."""

    per_client: int = 10
    per_user: int = 30
    window: int = 60


@dataclass(frozen=True)
class AuthConfig:
    service: str = "condery"  # the `service` of the challenge and the tokens' audience
    realm: str | None = None  # the token endpoint's URL; None: <scheme>://<Host>/token of the request
    issuer: str = "condery"  # `iss` of the tokens condery signs
    signing_key_file: str | None = None  # PEM private key (RSA: RS256, EC P-256: ES256), reread when it changes
    signing_secret: str | None = None  # or an HS256 secret (at least 32 characters)
    token_ttl: int = 300  # seconds an access token lives
    refresh_token_ttl: int = 7 * 24 * 3600  # seconds a refresh token (OAuth2, docker's identitytoken) lives
    leeway: int = 30  # seconds of clock skew tolerated on exp, nbf and iat
    users_file: str | None = None  # htpasswd, bcrypt only (htpasswd -B), reread when it changes
    groups_file: str | None = None  # YAML {group: [user, ...]}, reread when it changes
    robots: Mapping[str, RobotAccount] = field(default_factory=dict)
    oidc: OidcConfig | None = None
    rules: tuple[PullRule, ...] = (PullRule(("**",), ("authenticated",)),)
    endpoints: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ENDPOINT_RIGHTS))
    channels: tuple[ChannelRule, ...] = ()
    failed_logins: FailedLoginLimits = field(default_factory=FailedLoginLimits)


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    channels: tuple[str, ...] = ("conda-forge",)
    platforms: tuple[str, ...] = ("linux-64",)
    prefix: str = "/opt/conda"
    base_image: str = DEFAULT_BASE_IMAGE
    # A Docker config.json with the base image registry's credentials (bases/auth.py);
    # unset: $REGISTRY_AUTH_FILE, else ${XDG_RUNTIME_DIR}/containers/auth.json and
    # $DOCKER_CONFIG/config.json (~/.docker/config.json), as podman and skopeo read them.
    base_image_auth_file: str | None = None
    # Seconds a base pinned only by tag (debian:12) is used before its tag is asked for
    # again; a base pinned by digest is never asked for again.
    base_image_refresh: int = 24 * 3600
    storage: StorageConfig = field(default_factory=StorageConfig)
    coordination: CoordinationConfig = field(default_factory=CoordinationConfig)
    gc: GcConfig = field(default_factory=GcConfig)
    # Most engines refuse images of more than ~125 layers; leave room for the base.
    layer_budget: int = 100
    latest_ttl: int = 3600  # seconds a `latest` solve is reused before solving again
    # A date tag is cached forever only once its day ended this long ago (packages built
    # that day may still be uploaded); before that it is re-solved like `latest`.
    snapshot_grace: int = 2 * 24 * 3600  # seconds
    meta_packages: Mapping[str, MetaPackage] = field(
        default_factory=lambda: dict(DEFAULT_META_PACKAGES)
    )
    max_packages: int = 500
    max_concurrent_builds: int = 2
    # Cold builds waiting for a slot; past it a new name gets 429 (joining a build is free).
    max_queued_builds: int = 16
    # Cold builds one client (the peer address) may have running or waiting at once.
    max_builds_per_client: int = 2
    failed_solve_ttl: int = 60  # seconds an unsatisfiable name is answered without solving
    solve_timeout: int = 120  # seconds
    build_timeout: int = 1800  # seconds
    # Where downloaded package archives are kept (verified by sha256 before use).
    package_cache: str | None = None  # default: <filesystem store>/pkgs or ~/.cache
    package_cache_max_size: int = 20 << 30  # least recently used archives go past it (archive_cache.py)
    allow_package_scripts: bool = False  # run post-link scripts (untrusted code!)
    # Package downloads in flight at once, apart from the CPU-bound layer work: a slow
    # channel should not hold the cores, nor the cores the network.
    max_concurrent_downloads: int = 8
    # Processes that write package layers (layers/workers.py), started once; 0: one per
    # core. Each holds ~40 MB of its own; fewer make cold builds of many packages slower.
    layer_workers: int = 0
    # What one package may unpack to. conda-forge's largest packages (CUDA and PyTorch
    # builds) unpack to 3-5 GB and tens of thousands of files; a bomb of 66 KB that
    # inflates to gigabytes is refused from its tar headers. Sizes take 8GiB, 500MB, ...
    max_package_unpacked_size: int = 8 << 30
    max_package_files: int = 250_000
    # Connections (condery/registry/connections.py). 0: half the open-file limit, at
    # most 4096; the rest of the file descriptors are for the store and builds.
    max_connections: int = 0
    max_connections_per_client: int = 0  # 0: an eighth of max_connections, at least 8
    header_timeout: int = 15  # seconds to send a request's headers, else 408 and closed
    idle_timeout: int = 30  # seconds a keep-alive connection may wait for its next request
    # "text" (key=value lines for people) or "json" (one JSON object a line, for log shippers).
    log_format: str = "text"
    # "gzip" (every client) or "zstd" (smaller, faster to unpack; containerd 1.5+, podman,
    # Docker 23+; such images are served as OCI manifests only: negotiation.py).
    layer_compression: str = GZIP
    # A folder of environment files served as envs/<name>: <name>.yml, <name>.yaml or
    # <name>/environment.yml (build/environments.py), read again when they change.
    environments_dir: str | None = None
    # Where environment files' pip packages come from: a PEP 503/691 simple index (a
    # mirror, or file:///dir/simple for a site without internet). Wheels only.
    pypi_index: str = "https://pypi.org/simple"
    # Who may pull what (docs/auth.md); None: anonymous pulls and open endpoints, as before.
    auth: AuthConfig | None = None

    @property
    def package_cache_dir(self) -> Path:
        if self.package_cache:
            return Path(self.package_cache)
        if self.storage.backend == "filesystem":
            return Path(self.storage.path) / "pkgs"
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condery" / "pkgs"


