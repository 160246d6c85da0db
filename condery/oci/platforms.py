"""Conda subdirs and OCI platforms: the two names of one target."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OciPlatform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    def to_json(self) -> dict[str, str]:
        """The `platform` object of an OCI index entry (Docker uses the same fields)."""
        data = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            data["variant"] = self.variant
        return data

    def matches(self, os: str | None, architecture: str | None, variant: str | None) -> bool:
        """Whether an index entry's platform fields name this platform.

        A missing variant on either side matches: registries often omit `v8` for arm64,
        and an amd64 entry carries no variant at all.
        """
        if os != self.os or architecture != self.architecture:
            return False
        return not variant or not self.variant or variant == self.variant


_SUBDIRS: dict[str, OciPlatform] = {
    "linux-64": OciPlatform("linux", "amd64"),
    "linux-aarch64": OciPlatform("linux", "arm64", "v8"),
    "linux-ppc64le": OciPlatform("linux", "ppc64le"),
    "linux-s390x": OciPlatform("linux", "s390x"),
}


def oci_platform(subdir: str) -> OciPlatform:
    """The OCI platform of a conda subdir; ValueError for subdirs with no Linux image."""
    try:
        return _SUBDIRS[subdir]
    except KeyError:
        raise ValueError(
            f"conda subdir {subdir!r} has no container platform; "
            f"supported: {', '.join(sorted(_SUBDIRS))}"
        ) from None


def conda_subdir(platform: OciPlatform) -> str:
    """The conda subdir of an OCI platform (inverse of `oci_platform`)."""
    for subdir, known in _SUBDIRS.items():
        if known.matches(platform.os, platform.architecture, platform.variant):
            return subdir
    raise ValueError(f"platform {platform} has no conda subdir")
