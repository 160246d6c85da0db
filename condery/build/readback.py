"""Every image read back as a file: `environment.yml`, `explicit.txt` and `conda-lock.yml`
from what its name and tag solve to (look.py), so that a name becomes a file again.

    environment.yml   the packages pinned (`name=version=build`), the channels, the
                      file's variables: `conda env create -f` / `micromamba create -f`
    explicit.txt      one platform's @EXPLICIT lock, as the image's conda-meta holds it
    conda-lock.yml    conda-lock's unified format (version 1), every platform, URLs and
                      hashes: pushed back to condery it is a frozen image

A lock read back from a lock's image is that lock again (image/environment.py's id
covers only the packages), so it names the same image.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from condery.build.look import ImageLook, SolvedPlatform
from condery.common.redact import redact_url
from condery.image.names import ImageRequest
from condery.oci.errors import ManifestUnknown

FORMATS = ("environment.yml", "explicit.txt", "conda-lock.yml")


def platform_of(look: ImageLook, platform: str | None) -> tuple[str, SolvedPlatform]:
    subdir = platform or next(iter(look.solved.platforms))
    found = look.solved.platforms.get(subdir)
    if found is None:
        raise ManifestUnknown(f"{look.name}:{look.tag} has no packages for platform {subdir[:40]!r} "
                              f"(it has {', '.join(look.solved.platforms)})")
    return subdir, found


def environment_yml(name: str, subdir: str, solved: SolvedPlatform, request: ImageRequest,
                    channels: Sequence[str]) -> str:
    """One platform's environment, every package pinned (`conda env export` without the prefix)."""
    environment = request.environment
    document: dict[str, Any] = {
        "name": (environment.display_name if environment else None) or name.replace("/", "-"),
        "channels": [*file_channels(channels), "nodefaults"],
        "dependencies": [f"{p.name}={p.version}={p.build}" for p in solved.packages],
    }
    if solved.wheels:
        document["dependencies"].append({"pip": [f"{w.name}=={w.version}" for w in solved.wheels]})
    if environment is not None and environment.variables:
        document["variables"] = dict(environment.variables)
    header = f"# {name} for {subdir}, as condery solved it\n"
    return header + yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def conda_lock_yml(name: str, platforms: Mapping[str, SolvedPlatform], channels: Sequence[str]) -> str:
    """conda-lock's unified format for `platforms` (every platform of an image, or the one
    an image itself holds)."""
    packages = []
    for subdir, solved in platforms.items():
        for p in solved.packages:
            packages.append({
                "name": p.name,
                "version": p.version,
                "manager": "conda",
                "platform": subdir,
                "dependencies": dict(_dependency(d) for d in p.depends),
                "url": p.url,
                "hash": {k: v for k, v in (("md5", p.md5), ("sha256", p.sha256)) if v},
                "category": "main",
                "optional": False,
            })
        for w in solved.wheels:
            packages.append({
                "name": w.name, "version": w.version, "manager": "pip", "platform": subdir, "dependencies": {},
                "url": w.url, "hash": {"sha256": w.sha256}, "category": "main", "optional": False,
            })
    document = {
        "version": 1,
        "metadata": {
            "content_hash": {subdir: hashlib.sha256(solved.lock.encode()).hexdigest()
                             for subdir, solved in platforms.items()},
            "channels": [{"url": c, "used_env_vars": []} for c in file_channels(channels)],
            "platforms": list(platforms),
            "sources": [f"condery:{name}"],
        },
        "package": packages,
    }
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def read_back(look: ImageLook, request: ImageRequest, channels: Sequence[str], file: str,
              platform: str | None) -> str:
    """The image a look found as `file` (one of FORMATS); one platform's for all but conda-lock.yml."""
    if file == "conda-lock.yml":
        return conda_lock_yml(look.name, look.solved.platforms, channels)
    subdir, solved = platform_of(look, platform)
    if file == "explicit.txt":
        return solved.lock
    return environment_yml(f"{look.name}:{look.tag}", subdir, solved, request, channels)


def in_image_files(name: str, subdir: str, solved: SolvedPlatform, request: ImageRequest,
                   channels: Sequence[str]) -> dict[str, str]:
    """What an image's conda-meta/ holds of the read-back files (explicit.txt is written by
    the environment layer itself). Nothing of the tag: the image must not depend on it."""
    return {
        "conda-meta/environment.yml": environment_yml(name, subdir, solved, request, channels),
        "conda-meta/conda-lock.yml": conda_lock_yml(name, {subdir: solved}, channels),
    }


def _dependency(depend: str) -> tuple[str, str]:
    name, _, spec = re.sub(r"\s+", " ", depend.strip()).partition(" ")
    return name, spec or "*"


def file_channels(channels: list[str]) -> list[str]:
    """The channels as a file names them for this registry: a URL without credentials, a
    local channel by its directory's name (never the server's path; condery accepts it)."""
    return [Path(c.removeprefix("file://")).name if c.startswith(("/", "file:")) else redact_url(c).rstrip("/")
            for c in channels]
