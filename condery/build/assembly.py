"""Pure steps from a solved environment to the image's documents: no I/O here, so tests
can call them directly.

The served manifests depend on the image's content only, never on the tag that asked
for it: `latest` and a date that solve to the same packages have one digest. A tag name
belongs in an OCI layout's index.json (oci/layout.py) and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import rattler

from condery.config import Config
from condery.image.meta import MetaPackage, combine_meta_packages
from condery.image.names import ImageRequest
from condery.layers.activation import Activation
from condery.layers.env_layer import Account
from condery.oci.manifest import Descriptor, ImageSettings
from condery.oci.platforms import OciPlatform

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


def meta_settings(config: Config, request: ImageRequest) -> MetaPackage:
    """The combined settings of the name's meta-packages (parse_name refused conflicts)."""
    return combine_meta_packages({name: config.meta_packages[name] for name in request.meta})


def _has(records: Sequence[rattler.RepoDataRecord], name: str) -> bool:
    return any(r.name.normalized == name for r in records)


def image_account(config: Config, request: ImageRequest, records: Sequence[rattler.RepoDataRecord],
                  base_passwd: str | None, base_group: str | None) -> Account | None:
    """The user the image runs as, with its shell and directories resolved; None: the base's."""
    meta = meta_settings(config, request)
    user = meta.user
    if user is None:
        return None
    # The environment's bash when it has one: the shell a terminal in JupyterLab opens.
    shell = user.shell or (f"{config.prefix}/bin/bash" if _has(records, "bash") else "/bin/sh")
    return Account(name=user.name, uid=user.uid, gid=user.gid, group=user.group, home=user.home, shell=shell,
                   workdir=meta.workdir or user.home, base_passwd=base_passwd, base_group=base_group)


def default_cmd(prefix: str, records: Sequence[rattler.RepoDataRecord]) -> tuple[str, ...] | None:
    """What `docker run IMAGE` runs when nothing else says: the environment's shell, else
    its python; without either nothing (an engine then asks for a command)."""
    for program in ("bash", "python"):
        if _has(records, program):
            return (f"{prefix}/bin/{program}",)
    return None


def image_settings(
    config: Config, request: ImageRequest, records: Sequence[rattler.RepoDataRecord], created: datetime, lock: str,
    account: Account | None = None, activation: Activation | None = None, scratch: bool = False,
) -> ImageSettings:
    """The image's config settings. `activation` (layers/activation.py): its static
    variables join Env (after condery's own defaults, before a meta-package's and an
    environment file's, which are the user's word), and when some activation script is not
    static the activating entrypoint is put in front of the Entrypoint, run by /bin/sh
    (on `scratch`, which has none, by the environment's bash; without one there is no
    entrypoint and only shells see those scripts' variables)."""
    prefix = config.prefix
    activate = f"{prefix}/etc/condery/activate.sh"
    env: dict[str, str] = {"CONDA_PREFIX": prefix, "LANG": "C.UTF-8", "BASH_ENV": activate, "ENV": activate}
    if _has(records, "ca-certificates"):
        bundle = f"{prefix}/ssl/cacert.pem"
        env.update(SSL_CERT_FILE=bundle, REQUESTS_CA_BUNDLE=bundle, CURL_CA_BUNDLE=bundle)
    path_prefix = f"{prefix}/bin"
    activation_entrypoint = None
    if activation is not None:
        env.update(activation.env)
        path_prefix = ":".join([*activation.path_prepend, path_prefix])
        shell = f"{prefix}/bin/bash" if scratch and _has(records, "bash") else None if scratch else "/bin/sh"
        if activation.needs_entrypoint and shell is not None:
            activation_entrypoint = (shell, f"{prefix}/etc/condery/entrypoint.sh")
    meta = meta_settings(config, request)
    user = workdir = None
    if account is not None:
        # Numeric, so that Kubernetes' runAsNonRoot can check it without the image's passwd.
        user, workdir = f"{account.uid}:{account.gid}", account.workdir
        env.update(HOME=account.home, SHELL=account.shell)
    env.update(meta.env)  # a meta-package's own word is the last
    labels = {
        **meta.labels,
        f"{LABEL_PREFIX}.name": request.canonical_name,
        f"{LABEL_PREFIX}.specs": json.dumps(list(request.specs)),
        f"{LABEL_PREFIX}.lock.digest": "sha256:" + hashlib.sha256(lock.encode()).hexdigest(),
    }
    environment = request.environment
    if environment is not None:
        # conda's `variables:` are set by `conda activate`; in the config, every process
        # (exec form, `podman exec`) has them, as conda-meta/state has them for conda.
        env.update(dict(environment.variables))
        labels[f"{LABEL_PREFIX}.environment.id"] = environment.id
        if environment.display_name:
            labels[f"{LABEL_PREFIX}.environment.name"] = environment.display_name
    return ImageSettings(
        env=env, path_prefix=path_prefix, labels=labels, user=user, workdir=workdir or meta.workdir,
        cmd=meta.cmd, entrypoint=meta.entrypoint, default_cmd=default_cmd(prefix, records), created=created,
        activation_entrypoint=activation_entrypoint,
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
