"""Pure steps from a solved environment to the image's documents: no I/O here, so tests
can call them directly.

The served manifests depend on the image's content only, never on the tag that asked
for it: `latest` and a date that solve to the same packages have one digest. A tag name
belongs in an OCI layout's index.json (registry/oci_layout.py) and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import rattler

from condery.config import Config
from condery.registry.manifest import Descriptor, ImageSettings
from condery.registry.names import ImageRequest
from condery.registry.platforms import OciPlatform

LABEL_PREFIX = "org.condery"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class PlatformImage:
    platform: OciPlatform
    oci: Descriptor
    docker: Descriptor
    lock: str


def created_of(records: Sequence[rattler.RepoDataRecord]) -> datetime:
    """The newest package's timestamp: the same packages give the same date (and digest)."""
    return max((r.timestamp for r in records if r.timestamp), default=_EPOCH)


def image_settings(
    config: Config, request: ImageRequest, records: Sequence[rattler.RepoDataRecord], created: datetime, lock: str
) -> ImageSettings:
    prefix = config.prefix
    activate = f"{prefix}/etc/condery/activate.sh"
    env: dict[str, str] = {"CONDA_PREFIX": prefix, "LANG": "C.UTF-8", "BASH_ENV": activate, "ENV": activate}
    if any(r.name.normalized == "ca-certificates" for r in records):
        bundle = f"{prefix}/ssl/cacert.pem"
        env.update(SSL_CERT_FILE=bundle, REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle)
    user = workdir = None
    cmd: Sequence[str] | None = None
    for name in request.meta:
        meta = config.meta_packages[name]
        env.update(meta.env)
        user = meta.user or user
        workdir = meta.workdir or workdir
        cmd = meta.cmd or cmd
    labels = {
        f"{LABEL_PREFIX}.name": request.canonical_name,
        f"{LABEL_PREFIX}.specs": json.dumps(list(request.specs)),
        f"{LABEL_PREFIX}.lock.digest": "sha256:" + hashlib.sha256(lock.encode()).hexdigest(),
    }
    return ImageSettings(
        env=env, path_prefix=f"{prefix}/bin", labels=labels, user=user, workdir=workdir, cmd=cmd, created=created,
    )


def manifest_annotations(request: ImageRequest, created: datetime) -> dict[str, str]:
    # No org.opencontainers.image.ref.name: it would make the digest depend on the tag.
    return {
        "org.opencontainers.image.created": created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "org.opencontainers.image.title": request.canonical_name,
        "org.opencontainers.image.description": "conda environment: " + ", ".join(request.specs),
    }


def layer_annotations(packages: Sequence[str]) -> dict[str, str]:
    return {f"{LABEL_PREFIX}.packages": " ".join(packages)}
