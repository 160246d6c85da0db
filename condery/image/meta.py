"""Meta-packages: a name component that stands for a set of specs plus image settings
(`jupyter`, `shell`), and how several of them combine in one name. Pure data: the
configuration reads them (condery/config), names and builds use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class ImageUser:
    """The account an image runs as. The environment layer writes it into /etc/passwd and
    /etc/group (the base's entries kept) and creates its home owned by it, so that every
    runtime agrees: containerd and runc create a missing working directory as root."""

    name: str
    uid: int
    gid: int
    group: str  # the primary group's name (a base group with this gid or name is replaced)
    home: str
    shell: str | None = None  # None: the environment's bash if it has one, else /bin/sh


@dataclass(frozen=True)
class MetaPackage:
    """A name component that stands for a set of specs plus image settings."""

    specs: tuple[str, ...]
    user: ImageUser | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None  # None with a user: the user's home
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Environments held beside the meta-package's own, each at <prefix>/envs/<name> and
    # registered as a Jupyter kernel: names of the environments folder (`team-a`), pushed
    # environments (`env/<id>`), or `all` (every environment of the folder).
    kernels: tuple[str, ...] = ()
    # The environment its user may change (build/changeable.py): the prefix and its package
    # layers owned by `user`, and conda and pip added, configured for the image's channels
    # with its packages pinned. None: not set (off unless another meta-package of the name
    # sets it).
    changeable: bool | None = None


# What a changeable environment adds to its specs: the package managers whose
# configuration it writes. `mamba` or `micromamba` in a meta-package's specs read the
# same `.condarc`.
PACKAGE_MANAGER_SPECS = ("conda", "pip")

JOVYAN = ImageUser(name="jovyan", uid=1000, gid=100, group="users", home="/home/jovyan")
DEFAULT_META_PACKAGES: dict[str, MetaPackage] = {
    # What a CI job reaches for first: a shell, git, curl with CA certificates, archives.
    "shell": MetaPackage(specs=("bash", "coreutils", "git", "curl", "ca-certificates", "tar", "gzip",
                                "findutils", "sed", "grep", "less")),
    # The Jupyter Docker Stacks' conventions (jovyan, uid 1000, gid 100 `users`, which
    # z2jh's fsGid defaults to), and the command KubeSpawner and z2jh run by default.
    # Not start-notebook.sh: it exists to drop root and chown the home, which this image
    # needs neither of (docs/jupyterhub.md). Changeable, as the Docker Stacks' /opt/conda
    # is jovyan's: users `conda install` and `pip install` into their running server.
    "jupyter": MetaPackage(
        specs=("jupyterlab", "jupyterhub-singleuser"),
        user=JOVYAN,
        workdir="/home/jovyan",
        cmd=("jupyterhub-singleuser",),
        changeable=True,
    ),
}


class MetaConflict(ValueError):
    """Two meta-packages of one name give one setting different values."""


def combine_meta_packages(packages: Mapping[str, MetaPackage]) -> MetaPackage:
    """The settings of several meta-packages used together (`jupyter/shell/numpy`).

    Components have no order (`a/b` is `b/a`), so no meta-package can win by coming
    later: specs, env and labels are united, and each setting (user, workdir, cmd,
    entrypoint, one env variable, one label) may be given by several only if they agree.
    Anything else is a MetaConflict naming both.
    """
    specs: list[str] = []
    kernels: list[str] = []
    single: dict[str, tuple[str, Any]] = {}  # setting -> (meta-package that set it, value)
    merged: dict[str, dict[str, str]] = {"env": {}, "labels": {}}
    owners: dict[tuple[str, str], str] = {}

    def agree(setting: str, name: str, value: Any, seen: tuple[str, Any] | None) -> None:
        if seen is not None and seen[1] != value:
            raise MetaConflict(f"meta-packages {seen[0]!r} and {name!r} set {setting} differently; "
                               "use one of them, or configure a meta-package that combines them")

    for name in sorted(packages):
        package = packages[name]
        specs.extend(s for s in package.specs if s not in specs)
        kernels.extend(k for k in package.kernels if k not in kernels)
        for setting in ("user", "workdir", "cmd", "entrypoint", "changeable"):
            value = getattr(package, setting)
            if value is not None:
                agree(setting, name, value, single.get(setting))
                single.setdefault(setting, (name, value))
        for kind in ("env", "labels"):
            for key, value in getattr(package, kind).items():
                known = merged[kind].get(key)
                agree(f"{kind} {key}", name, value, None if known is None else (owners[(kind, key)], known))
                merged[kind][key] = value
                owners.setdefault((kind, key), name)
    values = {setting: value for setting, (_, value) in single.items()}
    if values.get("changeable"):
        specs.extend(s for s in PACKAGE_MANAGER_SPECS if s not in specs)
    return MetaPackage(specs=tuple(specs), env=merged["env"], labels=merged["labels"], kernels=tuple(kernels),
                       **values)


