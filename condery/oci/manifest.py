"""Image configs, manifests and indexes as bytes: pure functions, no I/O.

Everything here is deterministic: the same arguments give the same bytes and therefore
the same digest, which is what lets two replicas (or two days) agree on an image. JSON is
written with sorted keys and no whitespace.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from condery.common.jsonobject import json_object
from condery.oci.grammar import is_digest
from condery.oci.media_types import (
    CONFIG_TYPES,
    DOCKER_CONFIG,
    DOCKER_LAYER_FOREIGN_GZIP,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_NONDIST_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
)
from condery.oci.platforms import OciPlatform

# Layer media types a base image may bring; each maps to its OCI and Docker spelling
# (None: Docker schema 2 has no way to say it).
_LAYER_TYPES: dict[str, tuple[str, str | None]] = {
    OCI_LAYER_GZIP: (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP),
    DOCKER_LAYER_GZIP: (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP),
    OCI_LAYER_NONDIST_GZIP: (OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_FOREIGN_GZIP),
    DOCKER_LAYER_FOREIGN_GZIP: (OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_FOREIGN_GZIP),
    OCI_LAYER_TAR: (OCI_LAYER_TAR, None),
    OCI_LAYER_ZSTD: (OCI_LAYER_ZSTD, None),
}
LAYER_TYPES = frozenset(_LAYER_TYPES)

# What a shell gets when the base image sets no PATH (Docker's and containerd's default).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The config fields of the OCI image spec, plus Docker's Healthcheck which engines honour;
# other Docker-only fields (Hostname, AttachStdin, ...) describe a container, not an image.
_CONFIG_FIELDS = (
    "User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
    "StopSignal", "Healthcheck",
)


MAX_MANIFEST_SIZE = 4 << 20  # Distribution's own limit for a manifest PUT


class ManifestError(ValueError):
    """An image cannot be expressed in the requested format, or a descriptor is malformed."""


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = None
    platform: OciPlatform | None = None
    urls: tuple[str, ...] | None = None  # only for foreign / non-distributable layers

    def to_json(self, media_type: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "mediaType": media_type or self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.urls:
            data["urls"] = list(self.urls)
        if self.annotations:
            data["annotations"] = dict(self.annotations)
        if self.platform is not None:
            data["platform"] = self.platform.to_json()
        return data


@dataclass(frozen=True)
class ImageSettings:
    """What the image adds on top of the base image's config."""

    env: Mapping[str, str]  # PATH here replaces the base PATH (path_prefix still goes first)
    path_prefix: str  # put in front of PATH, e.g. "/opt/conda/bin"
    labels: Mapping[str, str]
    user: str | None
    workdir: str | None
    cmd: Sequence[str] | None
    created: datetime  # deterministic: the newest package timestamp, not "now"
    # Replaces the base's Entrypoint, and (as a Dockerfile's ENTRYPOINT does) drops its Cmd
    # unless `cmd` is given too: the base's Cmd was written for the base's entrypoint.
    entrypoint: Sequence[str] | None = None
    # Cmd when neither the base nor `cmd`/`entrypoint` gives one: `podman run IMAGE` with no
    # command otherwise fails with "no command or entrypoint provided".
    default_cmd: Sequence[str] | None = None
    # Put before the Entrypoint (the base's, or `entrypoint`), which it then runs: the
    # activating entrypoint (env_layer.py). Unlike `entrypoint` it keeps the Cmd.
    activation_entrypoint: Sequence[str] | None = None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _rfc3339(moment: datetime) -> str:
    if moment.tzinfo is None:  # a naive timestamp is taken as UTC rather than local time
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_descriptor(obj: Any) -> Descriptor:
    """A Descriptor from untrusted JSON (an upstream manifest or a local layout)."""
    if not isinstance(obj, Mapping):
        raise ManifestError("descriptor is not a JSON object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError("descriptor has no mediaType")
    if not is_digest(digest):
        raise ManifestError(f"descriptor digest {digest!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"descriptor size {size!r} is not a non-negative integer")
    annotations = obj.get("annotations")
    if annotations is not None and not (
        isinstance(annotations, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items())
    ):
        raise ManifestError("descriptor annotations must map strings to strings")
    platform = None
    raw_platform = obj.get("platform")
    if raw_platform is not None:
        if not isinstance(raw_platform, Mapping):
            raise ManifestError("descriptor platform is not a JSON object")
        os_, arch, variant = (raw_platform.get(k) for k in ("os", "architecture", "variant"))
        if not isinstance(os_, str) or not isinstance(arch, str):
            raise ManifestError("descriptor platform needs os and architecture")
        platform = OciPlatform(os_, arch, variant if isinstance(variant, str) else None)
    urls = obj.get("urls")
    if urls is not None and not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
        raise ManifestError("descriptor urls must be a list of strings")
    return Descriptor(
        media_type, digest, size, dict(annotations) if annotations else None, platform,
        tuple(urls) if urls else None,
    )


def _merged_env(base_env: Sequence[str], settings: ImageSettings) -> list[str]:
    """Base Env with ours on top; PATH first, led by the prefix's bin directory."""
    base: dict[str, str] = {}
    for entry in base_env:
        if not isinstance(entry, str):
            raise ManifestError("base image Env entries must be strings")
        key, sep, value = entry.partition("=")
        if sep:  # entries without "=" mean nothing to an engine; drop them
            base[key] = value
    merged = {k: v for k, v in base.items() if k != "PATH"}
    merged.update({k: v for k, v in settings.env.items() if k != "PATH"})
    base_path = settings.env.get("PATH") or base.get("PATH") or DEFAULT_PATH
    entries = [p for p in base_path.split(":") if p and p != settings.path_prefix]
    path = ":".join([settings.path_prefix, *entries])
    # Base order is kept (it is the base author's), new keys follow in sorted order.
    ordered = [k for k in base if k in merged] + sorted(k for k in merged if k not in base)
    return [f"PATH={path}"] + [f"{k}={merged[k]}" for k in ordered]


def image_config(
    base_config: Mapping | None,
    diff_ids: Sequence[str],
    settings: ImageSettings,
    platform: OciPlatform,
    history: Sequence[str],
) -> bytes:
    """The image config: the base's layers, settings and history, then ours.

    `diff_ids` and `history` describe only the layers this image adds, one history line
    (created_by) per layer. `base_config` None means scratch.
    """
    if len(history) != len(diff_ids):
        raise ValueError(f"{len(diff_ids)} layers but {len(history)} history entries")
    for diff_id in diff_ids:
        if not is_digest(diff_id):
            raise ValueError(f"diff_id {diff_id!r} is not a sha256 digest")
    base = dict(base_config or {})
    base_rootfs = base.get("rootfs") or {"type": "layers", "diff_ids": []}
    base_diff_ids = base_rootfs.get("diff_ids") if isinstance(base_rootfs, Mapping) else None
    if not isinstance(base_diff_ids, list) or not all(
        is_digest(d) for d in base_diff_ids
    ):
        raise ManifestError("base image config has no valid rootfs.diff_ids")
    base_settings = base.get("config") or {}
    if not isinstance(base_settings, Mapping):
        raise ManifestError("base image config's 'config' is not an object")

    config: dict[str, Any] = {k: base_settings[k] for k in _CONFIG_FIELDS if base_settings.get(k)}
    config["Env"] = _merged_env(base_settings.get("Env") or [], settings)
    labels = dict(base_settings.get("Labels") or {})
    labels.update(settings.labels)
    if labels:
        config["Labels"] = labels
    if settings.user is not None:
        config["User"] = settings.user
    if settings.workdir is not None:
        config["WorkingDir"] = settings.workdir
    if settings.entrypoint is not None:
        config["Entrypoint"] = list(settings.entrypoint)
        config.pop("Cmd", None)
    if settings.cmd is not None:
        config["Cmd"] = list(settings.cmd)
    elif settings.default_cmd is not None and not config.get("Cmd") and not config.get("Entrypoint"):
        config["Cmd"] = list(settings.default_cmd)
    if settings.activation_entrypoint:
        config["Entrypoint"] = [*settings.activation_entrypoint, *(config.get("Entrypoint") or [])]

    created = _rfc3339(settings.created)
    base_history = base.get("history") or []
    if not isinstance(base_history, list):
        raise ManifestError("base image history is not a list")
    doc: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [*base_diff_ids, *diff_ids]},
        "history": [
            *base_history,
            *({"created": created, "created_by": line} for line in history),
        ],
    }
    if platform.variant:
        doc["variant"] = platform.variant
    return _dumps(doc)


def _layer_type(media_type: str, docker: bool) -> str:
    try:
        oci_type, docker_type = _LAYER_TYPES[media_type]
    except KeyError:
        raise ManifestError(f"unsupported layer media type {media_type!r}") from None
    if not docker:
        return oci_type
    if docker_type is None:
        raise ManifestError(
            f"a Docker schema 2 manifest cannot carry a {media_type} layer "
            "(only gzip layers); serve the OCI manifest instead"
        )
    return docker_type


def _config_type(media_type: str, docker: bool) -> str:
    if media_type not in CONFIG_TYPES:
        raise ManifestError(f"unsupported config media type {media_type!r}")
    return DOCKER_CONFIG if docker else OCI_CONFIG


def oci_manifest(
    config: Descriptor, layers: Sequence[Descriptor], annotations: Mapping[str, str]
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(_config_type(config.media_type, docker=False)),
        "layers": [layer.to_json(_layer_type(layer.media_type, docker=False)) for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return _dumps(doc)


def docker_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> bytes:
    """Docker schema 2: same blobs (so same digests), Docker media types, no annotations."""
    doc = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": _bare(config, _config_type(config.media_type, docker=True)),
        "layers": [
            _bare(layer, _layer_type(layer.media_type, docker=True), keep_urls=True)
            for layer in layers
        ],
    }
    return _dumps(doc)


def _bare(desc: Descriptor, media_type: str, keep_urls: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {"mediaType": media_type, "digest": desc.digest, "size": desc.size}
    if keep_urls and desc.urls:
        data["urls"] = list(desc.urls)
    return data


def oci_index(manifests: Sequence[Descriptor], annotations: Mapping[str, str] | None) -> bytes:
    entries = []
    for desc in manifests:
        if desc.media_type not in (OCI_MANIFEST, OCI_INDEX):
            raise ManifestError(f"an OCI index cannot list a {desc.media_type}")
        entries.append(desc.to_json())
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    if annotations:
        doc["annotations"] = dict(annotations)
    return _dumps(doc)


def docker_manifest_list(manifests: Sequence[Descriptor]) -> bytes:
    entries = []
    for desc in manifests:
        if desc.media_type != DOCKER_MANIFEST:
            raise ManifestError(f"a Docker manifest list cannot list a {desc.media_type}")
        if desc.platform is None:
            raise ManifestError("every Docker manifest list entry needs a platform")
        entry = _bare(desc, DOCKER_MANIFEST)
        entry["platform"] = desc.platform.to_json()
        entries.append(entry)
    return _dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": entries})


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index as a registry or layout gave it, verified against its digest."""

    data: bytes
    media_type: str
    digest: str


def quoted(value: object) -> str:
    """A value from an untrusted document, quoted for a message and kept short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_bytes(data: bytes, digest: str, size: int | None) -> None:
    """Untrusted bytes must be what their descriptor says: the size (when known) and the digest."""
    if size is not None and len(data) != size:
        raise ManifestError(f"blob {digest} has {len(data)} bytes, expected {size}")
    if sha256_digest(data) != digest:
        raise ManifestError(f"blob {digest} does not match its digest")


def manifest_json(data: bytes, what: str) -> dict[str, Any]:
    """An untrusted document that must be a JSON object; `what` names it in the error."""
    document = json_object(data)
    if document is None:
        raise ManifestError(f"{what} is not a JSON object")
    return document
