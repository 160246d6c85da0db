"""Solving an environment with py-rattler against the configured channels.

The solve targets the image's platform, not the machine condery runs on, so the virtual
packages are declared here (glibc from the base image) instead of detected locally.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol, Sequence

import rattler
from rattler import BuildString, Channel, GenericVirtualPackage, PackageName, Version
from rattler.exceptions import InvalidMatchSpecError, SolverError

from condery.common.redact import redact_text
from condery.layers.package_layer import http_status
from condery.layers.suggest import suggestions

log = logging.getLogger(__name__)

# glibc assumed when the base image does not tell (scratch): conda-forge's own floor.
DEFAULT_GLIBC = "2.17"
# The kernel is the host's, unknown at build time; pixi assumes the same floor.
ASSUMED_LINUX = "4.18"
_ARCHSPEC = {"linux-64": "x86_64", "linux-aarch64": "aarch64", "linux-ppc64le": "ppc64le"}


class SolveError(ValueError):
    """The specs cannot be solved; the message is the solver's own explanation."""


class SolveUnavailable(SolveError):
    """The solve could not finish for a passing reason (it took longer than the timeout, a
    channel could not be read): not an answer about the specs, so retry later."""


class ChannelUnavailable(SolveUnavailable):
    """A channel could not be read (unreachable, timed out, missing)."""


class SpecError(ValueError):
    """A spec is not a valid conda MatchSpec."""


@dataclass(frozen=True)
class SolveRequest:
    specs: tuple[str, ...]
    platform: str  # conda subdir, e.g. "linux-64"
    glibc: str | None = None  # from the base image; None means DEFAULT_GLIBC
    exclude_newer: datetime | None = None  # snapshot tags: the end of that UTC day


def channel(name_or_url: str) -> Channel:
    """`conda-forge`, `https://...`, `file:///...` or a local path as a rattler Channel."""
    if name_or_url.startswith("/"):
        name_or_url = Path(name_or_url).as_uri()
    return Channel(name_or_url)


def public_message(text: str, channels: Sequence[str]) -> str:
    """rattler's words without the server's file system: a local channel is named by its
    directory's name, never its path."""
    for name in channels:
        if name.startswith(("/", "file:")):
            url = channel(name).base_url
            path = Path(url.removeprefix("file://")).as_posix().rstrip("/")
            shown = f"local channel {Path(path).name}"
            text = text.replace(url, shown).replace(url.rstrip("/"), shown).replace(path, shown)
    return text


def network_reason(exc: BaseException, limit: int = 400) -> str:
    """rattler's network error in one line that says why: its headline, the URL it was
    fetching and the root cause ("Request failed after 3 retries: error sending request
    for url (https://…): failed to lookup address information: …"). The headline alone
    ("Request failed after 3 retries") leaves an operator without a reason."""
    lines = [line.removeprefix("Caused by:").strip() for line in str(exc).strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    picked = [lines[0]]
    picked += [line for line in lines[1:] if "url (" in line][:1]
    if lines[-1] not in picked:
        picked.append(lines[-1])
    # Redacted before it is cut: a cut inside `user:password@` would leave no `@` to find.
    text = redact_text(": ".join(picked))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def virtual_packages(platform: str, glibc: str | None) -> list[GenericVirtualPackage]:
    def vp(name: str, version: str, build: str = "0") -> GenericVirtualPackage:
        return GenericVirtualPackage(PackageName(name), Version(version), BuildString(build))

    packages = [vp("__unix", "0")]
    if platform.startswith("linux-"):
        packages += [vp("__linux", ASSUMED_LINUX), vp("__glibc", glibc or DEFAULT_GLIBC)]
    if platform in _ARCHSPEC:
        packages.append(vp("__archspec", "1", _ARCHSPEC[platform]))
    return packages


def check_specs(specs: Sequence[str]) -> None:
    """Raise SpecError for a spec rattler cannot parse (before any network I/O)."""
    for spec in specs:
        try:
            rattler.MatchSpec(spec)
        except (InvalidMatchSpecError, ValueError) as exc:
            raise SpecError(f"invalid package spec {spec!r}: {exc}") from None


async def solve(
    request: SolveRequest,
    channels: Sequence[str],
    gateway: rattler.Gateway,
    timeout: float,
) -> list[rattler.RepoDataRecord]:
    """The environment's records in topological order (dependencies first)."""
    check_specs(request.specs)
    sources = [channel(c) for c in channels]
    platforms = [request.platform, "noarch"]
    try:
        records = await asyncio.wait_for(
            rattler.solve(
                sources,
                list(request.specs),
                gateway=gateway,
                platforms=platforms,
                virtual_packages=virtual_packages(request.platform, request.glibc),
                exclude_newer=request.exclude_newer,
                # A snapshot is the channel as it was: rattler places each record by its
                # upload time (indexed_timestamp) and falls back to the build timestamp
                # for channels that do not record uploads; records with neither are left out.
                timestamp_policy="require-timestamp",
                # rattler stops its solver thread itself at the timeout (asyncio cannot);
                # it then reports "Solve operation has been cancelled".
                timeout=timedelta(seconds=timeout),
            ),
            # Covers the repodata fetch too, which rattler's own timeout does not.
            timeout=timeout,
        )
    except SolverError as exc:
        message = str(exc).strip()
        if "cancelled" in message.lower():
            raise SolveUnavailable(f"the solve took longer than {timeout:.0f} s") from None
        # A misspelt name is the commonest unsolvable request: say which names are close.
        hint = await suggestions(request.specs, sources, platforms, gateway)
        raise SolveError(public_message(message, channels) + hint) from None
    except asyncio.TimeoutError:
        raise SolveUnavailable(f"the solve took longer than {timeout:.0f} s") from None
    except Exception as exc:  # rattler raises its own types for fetch failures
        first = network_reason(exc)
        status = http_status(exc)
        if status in (401, 403, 407):
            # Configuration, not a passing fault, but nothing the client can fix either:
            # answered as unavailable, and told to the operator, who can.
            log.warning("a channel refused access (HTTP %d): check its credentials (RATTLER_AUTH_FILE): %s",
                        status, first)
            raise ChannelUnavailable(f"a channel refused access (HTTP {status}): "
                                     f"{public_message(first, channels)}") from None
        raise ChannelUnavailable(f"cannot read the channels: {public_message(first, channels)}") from None
    # sort_topologically hands back plain PackageRecords; keep the RepoDataRecords
    # (they carry the URL and channel) in that order.
    by_name = {record.name.normalized: record for record in records}
    return [by_name[r.name.normalized] for r in rattler.PackageRecord.sort_topologically(records)]


class LockedArchive(Protocol):
    """One package of a lock file (image/environment.py's LockedPackage)."""

    url: str
    subdir: str
    file_name: str
    sha256: str | None
    md5: str | None


async def locked_records(
    packages: Sequence[LockedArchive],
    channels: Sequence[str],
    gateway: rattler.Gateway,
    timeout: float,
) -> list[rattler.RepoDataRecord]:
    """A lock's packages as the channels' records, dependencies first, without solving.

    Each archive must be in the repodata of a configured channel with the lock's hash: the
    record (its dependencies, its sha256 for the download check) is the channel's, never
    the lock's word. A package missing from its channel, or with another hash, is a
    SolveError naming it; an unreadable channel a ChannelUnavailable.
    """
    bases = {c: channel(c).base_url.rstrip("/") + "/" for c in channels}
    wanted: dict[tuple[str, str], dict[str, LockedArchive]] = {}  # (channel, subdir) -> file name -> package
    for package in packages:
        home = next((c for c, base in bases.items() if package.url.startswith(base)), None)
        if home is None:
            raise SolveError(f"{package.file_name}: not in a channel this registry serves")
        wanted.setdefault((home, package.subdir), {})[package.file_name] = package
    found: list[rattler.RepoDataRecord] = []
    try:
        for (home, subdir), files in wanted.items():
            names = sorted({f.removesuffix(".conda").removesuffix(".tar.bz2").rsplit("-", 2)[0] for f in files})
            result = await asyncio.wait_for(
                gateway.query([channel(home)], [subdir], names, recursive=False), timeout=timeout)
            by_file = {r.file_name: r for per_source in result for r in per_source}
            for file_name, package in files.items():
                record = by_file.get(file_name)
                if record is None:
                    raise SolveError(f"{file_name} is locked but {public_message(home, channels)} has no such "
                                     f"package for {subdir} (removed, or another channel's)")
                if package.sha256 is not None and (record.sha256 is None or record.sha256.hex() != package.sha256):
                    raise SolveError(f"{file_name}: the lock's sha256 is not the channel's")
                if package.sha256 is None and (record.md5 is None or record.md5.hex() != package.md5):
                    raise SolveError(f"{file_name}: the lock's md5 is not the channel's")
                found.append(record)
    except asyncio.TimeoutError:
        raise SolveUnavailable(f"reading the channels took longer than {timeout:.0f} s") from None
    except SolveError:
        raise
    except Exception as exc:  # rattler raises its own types for fetch failures
        raise ChannelUnavailable(f"cannot read the channels: {public_message(network_reason(exc), channels)}") from None
    by_name = {record.name.normalized: record for record in found}
    return [by_name[r.name.normalized] for r in rattler.PackageRecord.sort_topologically(found)]
