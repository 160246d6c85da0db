"""A changeable environment: one its user may change in a running container (a
meta-package's `changeable`, on for `jupyter`), as Jupyter's Docker Stacks make /opt/conda
jovyan's. Pure: who owns the prefix, and the package managers' configuration files, no I/O.

- Owner: the image's user owns the prefix and everything under it. The package layers are
  written owned by that uid:gid and keyed by it (records/keys.py), so every image of one
  owner shares them; an image's root-owned layers are other layers.
- `conda` and `pip` are in the environment (image/meta.py PACKAGE_MANAGER_SPECS).
- `<prefix>/.condarc`: the channels the image was solved from, in priority order and
  without credentials (conda, mamba and micromamba read it from the prefix).
- `<prefix>/conda-meta/pinned`: python's major.minor and every spec the name asked for
  with a version, so that `conda install x` cannot silently replace the environment's
  python or undo what the image promises (conda and mamba read it on every solve).
- `<prefix>/pip.conf`: pip's index, the registry's `pypi_index` (pip reads `sys.prefix/pip.conf`).
"""

from __future__ import annotations

from typing import Sequence

import rattler

from condery.common.redact import redact_url
from condery.image.meta import PACKAGE_MANAGER_SPECS, MetaPackage
from condery.layers.env_layer import channel_name
from condery.layers.solve import channel

PYPI_DEFAULT = "https://pypi.org/simple"


def environment_owner(meta: MetaPackage) -> tuple[int, int] | None:
    """(uid, gid) that owns a changeable environment; None: root's, as every other one is."""
    if not meta.changeable or meta.user is None:
        return None
    return meta.user.uid, meta.user.gid


def changeable_json(meta: MetaPackage, prefix: str) -> dict[str, object] | None:
    """What the images API says of a changeable environment (None: it is not one)."""
    if not meta.changeable:
        return None
    uid, gid = environment_owner(meta) or (0, 0)
    return {"prefix": prefix, "owner": f"{uid}:{gid}", "package_managers": list(PACKAGE_MANAGER_SPECS)}


def condarc(channels: Sequence[str]) -> str:
    """The channels as conda names them, credentials left out. A channel on the registry's
    own disk (file://) means nothing inside a container: named in a comment only."""
    lines = ["# Written by condery: the channels this environment was built from, so that",
             "# `conda install` finds what its packages came from. No credentials: a private",
             "# channel needs your own (conda's `channels`/`custom_channels` in ~/.condarc).",
             "channels:"]
    local = []
    for name in channels:
        url = channel(name).base_url
        if url.startswith("file:"):
            local.append(name)
            continue
        lines.append(f"  - {channel_name(url)}")
    if len(lines) == 4:
        lines[-1] = "channels: []"
    # By its directory's name only: the registry's paths are not the image's business.
    lines += [f"# left out, on the registry's own disk: {n.rstrip('/').rsplit('/', 1)[-1]}" for n in local]
    lines += [
        # What the image was solved with: the first channel that has a package wins.
        "channel_priority: strict",
        # The image's packages are pinned (conda-meta/pinned): conda must not try to update itself.
        "auto_update_conda: false",
        "notify_outdated_conda: false",
    ]
    return "\n".join(lines) + "\n"


def pinned_file(records: Sequence[rattler.RepoDataRecord], requested_specs: Sequence[str]) -> str:
    """conda-meta/pinned: the name's own specs that carry a version, and python's
    major.minor when the name does not pin python itself."""
    installed = {r.name.normalized: r for r in records}
    pins: dict[str, str] = {}
    for text in sorted(requested_specs):
        spec = rattler.MatchSpec(text)
        name = spec.name.normalized if spec.name else None
        if name in installed and spec.version is not None:
            pins[name] = f"{name} {spec.version}"
    python = installed.get("python")
    if python is not None and "python" not in pins:
        major, minor = rattler.Version(str(python.version)).as_major_minor()
        pins["python"] = f"python {major}.{minor}.*"
    return "".join(f"{pins[name]}\n" for name in sorted(pins))


def pip_conf(pypi_index: str) -> str:
    return ("# Written by condery: the index this registry resolves pip packages from.\n"
            f"[global]\nindex-url = {redact_url(pypi_index)}\n")


def changeable_files(channels: Sequence[str], records: Sequence[rattler.RepoDataRecord],
                     requested_specs: Sequence[str], pypi_index: str) -> dict[str, str]:
    """The package managers' files of a changeable environment, relative to its prefix."""
    return {
        ".condarc": condarc(channels),
        "conda-meta/pinned": pinned_file(records, requested_specs),
        "pip.conf": pip_conf(pypi_index),
    }
