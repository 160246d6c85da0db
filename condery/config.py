"""Configuration: one YAML file, every key also settable as CONDERY_<KEY>.

Precedence, lowest first: embedded defaults, the YAML file, environment variables,
command-line flags. Environment values are parsed as YAML so that
`CONDERY_CHANNELS='[conda-forge, bioconda]'` and `CONDERY_PORT=8080` both work.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

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
class MetaPackage:
    """A name component that stands for a set of specs plus image settings."""

    specs: tuple[str, ...]
    user: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    cmd: tuple[str, ...] | None = None


DEFAULT_META_PACKAGES: dict[str, MetaPackage] = {
    "shell": MetaPackage(specs=("bash", "coreutils", "sed", "grep", "less")),
    "jupyter": MetaPackage(
        specs=("jupyterlab",),
        user="1000",
        workdir="/home/jovyan",
        env={"HOME": "/home/jovyan"},
        cmd=("jupyter", "lab", "--ip=0.0.0.0"),
    ),
}


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "filesystem"  # "filesystem" or "s3"
    path: str = "condery-data"  # filesystem: the store's root directory
    bucket: str | None = None  # s3
    endpoint_url: str | None = None
    region: str | None = None
    redirect: bool = False  # s3: answer blob GETs with a 307 to a presigned URL


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    channels: tuple[str, ...] = ("conda-forge",)
    platforms: tuple[str, ...] = ("linux-64",)
    prefix: str = "/opt/conda"
    base_image: str = DEFAULT_BASE_IMAGE
    storage: StorageConfig = field(default_factory=StorageConfig)
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
    allow_package_scripts: bool = False  # run post-link scripts (untrusted code!)
    # Package downloads in flight at once, apart from the CPU-bound layer work: a slow
    # channel should not hold the cores, nor the cores the network.
    max_concurrent_downloads: int = 8
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

    @property
    def package_cache_dir(self) -> Path:
        if self.package_cache:
            return Path(self.package_cache)
        if self.storage.backend == "filesystem":
            return Path(self.storage.path) / "pkgs"
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condery" / "pkgs"


_SCALARS = {f.name: f for f in dataclasses.fields(Config)}
# Integer keys where 0 would make the registry useless (0 failed_solve_ttl, 0 queue are fine).
_AT_LEAST_ONE = frozenset(
    {"layer_budget", "max_packages", "max_concurrent_builds", "max_builds_per_client", "max_package_files",
     "max_concurrent_downloads"}
)


def _coerce(key: str, value: Any) -> Any:
    """Turn a YAML or environment value into the type the Config field expects."""
    if key in ("channels", "platforms"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        return tuple(str(v) for v in value)
    if key == "storage":
        if not isinstance(value, Mapping):
            raise ConfigError(f"storage: expected a mapping, got {value!r}")
        known = {f.name for f in dataclasses.fields(StorageConfig)}
        unknown = set(value) - known
        if unknown:
            raise ConfigError(f"storage: unknown keys {sorted(unknown)}")
        storage = StorageConfig(**value)
        if storage.backend not in ("filesystem", "s3"):
            raise ConfigError(f"storage.backend must be filesystem or s3, not {storage.backend!r}")
        if storage.backend == "s3" and not storage.bucket:
            raise ConfigError("storage.bucket is required for the s3 backend")
        return storage
    if key == "meta_packages":
        if not isinstance(value, Mapping):
            raise ConfigError("meta_packages: expected a mapping of name to settings")
        metas = dict(DEFAULT_META_PACKAGES)
        for name, m in value.items():
            if isinstance(m, (list, tuple)):
                m = {"specs": m}
            if not isinstance(m, Mapping) or not m.get("specs"):
                raise ConfigError(f"meta_packages.{name}: needs a non-empty 'specs' list")
            metas[str(name)] = MetaPackage(
                specs=tuple(str(s) for s in m["specs"]),
                user=None if m.get("user") is None else str(m["user"]),
                env={str(k): str(v) for k, v in (m.get("env") or {}).items()},
                workdir=m.get("workdir"),
                cmd=tuple(m["cmd"]) if m.get("cmd") else None,
            )
        return metas
    default = _SCALARS[key].default
    if key in _SIZE_KEYS:
        return _parse_size(key, value)
    if isinstance(default, bool):
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        return bool(value)
    if isinstance(default, int):
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if number < 0 or (key in _AT_LEAST_ONE and number < 1):
            raise ConfigError(f"{key}: {number} is out of range")
        if key in ("header_timeout", "idle_timeout") and number < 1:  # 0 would close every connection
            raise ConfigError(f"{key}: {number} is out of range (at least 1 second)")
        return number
    return None if value is None else str(value)


_SIZE_KEYS = frozenset({"max_package_unpacked_size"})
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def _parse_size(key: str, value: Any) -> int:
    """Bytes from an integer or a size such as "8GiB", "500MB", "2G"."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", str(value), re.IGNORECASE)
        if match is None:
            raise ConfigError(f"{key}: expected a size such as 8GiB or 500MB, got {value!r}")
        number = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if number < 1:
        raise ConfigError(f"{key}: {number} is out of range")
    return number


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Build the effective configuration from defaults, `path`, `environ` and overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values.update(loaded)
    environ = os.environ if environ is None else environ
    for key in _SCALARS:
        raw = environ.get(f"CONDERY_{key.upper()}")
        if raw is not None:
            try:
                values[key] = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                values[key] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(_SCALARS)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {sorted(unknown)}")
    config = Config(**{k: _coerce(k, v) for k, v in values.items()})
    # The prefix is pasted into activation scripts and binary placeholders: keep it plain.
    if not re.fullmatch(r"(/[A-Za-z0-9._+-]+)+", config.prefix) or "/../" in config.prefix + "/":
        raise ConfigError(f"prefix must be an absolute path of [A-Za-z0-9._+-] parts, not {config.prefix!r}")
    return config
