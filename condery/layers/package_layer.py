"""One conda package -> one image layer.

Steps, each of which can refuse the package with a PackageError:

1. fetch: the archive goes to `<package_cache>/archives/<sha256>/<file name>` and is
   hashed before every use. py-rattler 0.28's installer does NOT check a download against
   the repodata sha256 (a channel whose repodata names the wrong hash installs silently,
   see tests/test_package_layer.py::test_sha256_mismatch_is_refused), so we fetch and
   verify ourselves and hand rattler only the verified local file. Downloads go through
   rattler's authenticated client (credentials from its auth file, never from a URL we
   keep), are retried with backoff on connection failures and 5xx (never on 4xx), and
   are given up when the channel sends nothing for DOWNLOAD_READ_TIMEOUT seconds.
2. inspect: index.json must name the package the repodata promised; every path in
   paths.json and every entry point must stay inside the prefix. rattler joins these
   paths onto the target directory as they are, so this check keeps a hostile package
   from writing outside the staging directory.
3. install: rattler links the one package into an empty staging directory, replacing
   prefix placeholders with the image's prefix (not the staging path). A `noarch: python`
   package is installed next to the environment's python record (ignored, so not
   installed) so that its files land in that python's site-packages.
4. compile (condery/layers/bytecode.py): the python modules of a package built for the
   image's python get deterministic pycs, recorded in its conda-meta record.
5. scrub and tar (in a thread): staging-only files go, the conda-meta record loses every
   build-machine path, and the tree becomes a reproducible layer at the prefix.

Most packages skip steps 3 to 5: their layer is written straight from the archive
(stream_layer.py, one job of stream_job.py), in a layer worker process (workers.py).

rattler's own extraction cache is a fresh directory per build, so two channels that
publish different archives under one name-version-build cannot poison each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, ContextManager, Protocol
from urllib.parse import unquote, urlparse

import rattler
import rattler.package_streaming as package_streaming
from rattler.networking import AuthenticationMiddleware, RetryMiddleware

from condery.common.redact import redact_url
from condery.common.slots import PrioritySlots
from condery.layers import LayerBlob, PackageError, PackageUnavailable
from condery.layers.archive_cache import IN_USE_SECONDS
from condery.layers.bytecode import BytecodePlan, CompiledFile, compile_bytecode, record_compiled
from condery.layers.compression import GZIP
from condery.layers.conda_meta import contains_path, record_bytes, scrub_record
from condery.layers.members import PackageLimits, verify_archive
from condery.layers.stream_job import StreamJob, StreamOutcome, build_streamed
from condery.layers.stream_layer import NotStreamable, PackageIdentity
from condery.layers.tarball import TreeOwner, check_member_name, write_layer
from condery.layers.workers import LayerWorkers, WorkerLost

log = logging.getLogger(__name__)


class LayerReport(Protocol):
    """Where a layer build reports its phases and downloads (condery.observability's BuildReport)."""

    def timed(self, phase: str) -> ContextManager[None]: ...

    def span(self, phase: str, started: float, ended: float | None = None) -> None: ...

    def downloaded(self, size: int) -> None: ...

# Bump when the layer contents change for the same package (scrubbing, tar layout...),
# so that layers cached under the old layout are not reused.
LAYOUT_VERSION = "v5"  # v2: tar hardlinks, mtime 1980-01-01; v3: python bytecode, libdeflate gzip members;
# v4: the tar's end blocks in a gzip member (zstd frame) of their own, so groups concatenate layers;
# v5: directories first, in members of their own (tarball.layer_order), so a group holds each once

_STAGING_ONLY = ("CACHEDIR.TAG", "conda-meta/history")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+!-]*\.(conda|tar\.bz2)$")  # _libgcc_mutex, _openmp_mutex
_ENTRY_POINT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_HASH_CHUNK = 1 << 20
_DOWNLOAD_POLL_SECONDS = 0.2
# Waits before the 2nd, 3rd and 4th attempt of a download that failed for a passing
# reason (connection reset or refused, 5xx). A 4xx is the channel's answer: no retry.
DOWNLOAD_RETRY_DELAYS = (0.5, 1.0, 2.0)
# Seconds a download may go without receiving a byte (before the answer starts, or in the
# middle of the body) before it is given up. Not a total time: a big package on a slow
# but live link is fine. Not retried: a stalled channel would hold the build for minutes.
DOWNLOAD_READ_TIMEOUT = 60.0
# rattler's errors are text: "HTTP status client error (401 Unauthorized) for url (...)".
_HTTP_STATUS = re.compile(r"HTTP status (?:client|server) error \((\d{3})[^)]*\)")


def dist_name(record: rattler.PackageRecord) -> str:
    return f"{record.name.normalized}-{record.version}-{record.build}"


def _sha256_hex(record: rattler.RepoDataRecord) -> str:
    if record.sha256 is None:
        raise PackageError(f"{dist_name(record)}: the channel gives no sha256, so it cannot be verified")
    return record.sha256.hex()


def _is_noarch_python(record: rattler.PackageRecord) -> bool:
    return bool(record.noarch.python)


def python_site_packages(python_record: rattler.RepoDataRecord | None) -> str | None:
    """Where `noarch: python` packages go for this python, e.g. "lib/python3.11/site-packages"."""
    if python_record is None:
        return None
    # Newer python builds say so themselves (free-threading builds use python3.13t).
    if python_record.python_site_packages_path:
        return python_record.python_site_packages_path
    major, minor = rattler.Version(str(python_record.version)).as_major_minor()
    return f"lib/python{major}.{minor}/site-packages"


def _check_prefix(prefix: str) -> None:
    if not prefix.startswith("/"):
        raise ValueError(f"prefix must be an absolute path, not {prefix!r}")
    check_member_name(prefix.strip("/"))


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _TooLarge(Exception):
    pass


class _Stalled(Exception):
    pass


def channel_client(max_retries: int = 0) -> rattler.Client:
    """rattler's HTTP client with its standard authentication.

    Credentials come from rattler's own stores: the JSON file named by RATTLER_AUTH_FILE
    (host -> {"BearerToken": ...} | {"BasicHTTP": {...}} | {"CondaToken": ...}), then the
    keyring and ~/.netrc. They are added to each request by rattler and never pass through
    condery's code, so they cannot reach an image, a log line or an error body.
    `max_retries` adds rattler's own retry (for the solver's repodata fetches); package
    downloads retry themselves (DOWNLOAD_RETRY_DELAYS) and pass 0.
    """
    middlewares: list[Any] = [AuthenticationMiddleware()]
    if max_retries:
        middlewares.insert(0, RetryMiddleware(max_retries))
    try:
        return rattler.Client(middlewares, user_agent="condery")
    except Exception as exc:  # rattler's AuthenticationStorageError: an unreadable auth file
        raise ValueError(f"cannot read the channel credentials (RATTLER_AUTH_FILE): {_first_line(exc)}") from None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a rattler network error reports, if it reports one."""
    match = _HTTP_STATUS.search(str(exc))
    return int(match.group(1)) if match else None


def _copy_hashed(source: Path, dest: Path) -> str:
    """Copy a local channel's archive and hash the bytes copied, in one pass (blocking)."""
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(dest, "wb") as out:
        while chunk := src.read(_HASH_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


async def _download(client: rattler.Client, url: str, dest: Path, max_bytes: int) -> str | None:
    """Fetch `url` to `dest`, stopped as soon as it passes `max_bytes` (a hostile or broken
    channel could otherwise fill the disk before the sha256 check ever runs) or when no
    byte arrives for DOWNLOAD_READ_TIMEOUT seconds. A local channel's archive is hashed as
    it is copied: the sha256 of `dest` is returned then (else None)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        source = Path(unquote(parsed.path))
        if source.stat().st_size > max_bytes:
            raise _TooLarge
        return await asyncio.to_thread(_copy_hashed, source, dest)
    elif parsed.scheme in ("http", "https"):
        # rattler streams to the file and offers neither a size cap nor a read timeout
        # (its client timeout is a total, which a big package on a slow link would pass):
        # watch the file instead.
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(package_streaming.download_to_path(client, url, dest))
        size, progress_at = -1, loop.time()
        try:
            while not task.done():
                await asyncio.wait([task], timeout=_DOWNLOAD_POLL_SECONDS)
                now_size = dest.stat().st_size if dest.exists() else 0
                if now_size > max_bytes:
                    raise _TooLarge
                if now_size != size:
                    size, progress_at = now_size, loop.time()
                elif not task.done() and loop.time() - progress_at > DOWNLOAD_READ_TIMEOUT:
                    raise _Stalled
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if dest.stat().st_size > max_bytes:
            raise _TooLarge
        return None
    else:
        raise PackageError(f"unsupported package URL scheme {parsed.scheme!r}")


async def _download_with_retries(client: rattler.Client, record: rattler.RepoDataRecord, dest: Path,
                                 limit: int) -> str | None:
    """`_download` (and what it returns), again after DOWNLOAD_RETRY_DELAYS when the failure
    may pass by itself.

    Raises PackageUnavailable for a channel that cannot be read now (refused access,
    4xx, 5xx or connection failures past the last attempt, a stall): the client may retry
    the pull later; the package itself has not been judged.
    """
    dist = dist_name(record)
    source = public_channel(record.channel)
    for attempt, delay in enumerate((*DOWNLOAD_RETRY_DELAYS, None), start=1):
        try:
            return await _download(client, record.url, dest, limit)
        except (PackageError, _TooLarge):
            raise
        except _Stalled:
            log.warning("download of %s from %s stalled: nothing received for %.0f s",
                        dist, redact_url(record.url), DOWNLOAD_READ_TIMEOUT)
            raise PackageUnavailable(f"{dist}: the channel {source} sent nothing for "
                                     f"{DOWNLOAD_READ_TIMEOUT:.0f} s") from None
        except Exception as exc:
            status = http_status(exc)
            if status in (401, 403, 407):
                # Retrying cannot help; the operator must fix the credentials.
                log.warning("channel %s refused access to %s (HTTP %d): check its credentials "
                            "(RATTLER_AUTH_FILE)", source, dist, status)
                raise PackageUnavailable(f"{dist}: the channel {source} refused access (HTTP {status})") from None
            if status is not None and status < 500:
                log.warning("download of %s from %s answered HTTP %d", dist, redact_url(record.url), status)
                raise PackageUnavailable(f"{dist}: the channel {source} answered HTTP {status}") from None
            if delay is None:
                log.warning("download of %s from %s failed after %d attempts: %s",
                            dist, redact_url(record.url), attempt, exc)
                raise PackageUnavailable(f"{dist}: download failed from {source}") from None
            log.info("download of %s from %s failed (%s); attempt %d in %.1f s",
                     dist, redact_url(record.url), exc, attempt + 1, delay)
            await asyncio.sleep(delay)


async def fetch_verified(record: rattler.RepoDataRecord, package_cache_dir: Path,
                         max_bytes: int = PackageLimits().max_unpacked_bytes,
                         client: rattler.Client | None = None,
                         report: LayerReport | None = None) -> Path:
    """The package archive on local disk, its sha256 checked against the repodata.

    The download stops past the size the repodata gives (or `max_bytes` when it gives
    none): more bytes than promised can only fail the sha256 check anyway. Nothing but
    a whole, verified archive is ever left in the cache. `client` is the channel client
    to share (AppState.download_client); without one a fresh one is made. `report` hears
    of the bytes downloaded and the time spent hashing ("verify").
    """
    sha = _sha256_hex(record)
    dist = dist_name(record)
    if not _FILE_NAME.match(record.file_name):
        raise PackageError(f"{dist}: unexpected archive file name {record.file_name!r}")
    path = Path(package_cache_dir) / "archives" / sha / record.file_name

    def verifying() -> ContextManager[None]:
        return report.timed("verify") if report else contextlib.nullcontext()

    limit = record.size if record.size else max_bytes
    if record.url.startswith("file:"):
        # A local channel: the cache check, the copy, its hash and the rename in one thread
        # hop (three hops held each of an image's hundreds of small packages ~20 ms).
        try:
            with verifying():
                size = await asyncio.to_thread(_fetch_local, Path(unquote(urlparse(record.url).path)), path, sha,
                                               dist, limit)
        except _TooLarge:
            raise PackageError(f"{dist}: the channel serves more than the {limit} bytes its repodata gives") from None
        except OSError:
            size = -1  # the general way below retries and reports it as it does for any channel
        if size is None:
            return path
        if size >= 0:
            if report is not None:
                report.downloaded(size)
            return path
    with verifying():
        tmp = await asyncio.to_thread(_cache_slot, path, sha, dist)
    if tmp is None:
        return path
    try:
        try:
            # A local channel's archive is hashed as it is copied: that pass is the "verify".
            hashing = report.timed("verify") if report and record.url.startswith("file:") else contextlib.nullcontext()
            with hashing:
                hashed = await _download_with_retries(client or channel_client(), record, tmp, limit)
        except _TooLarge:
            raise PackageError(f"{dist}: the channel serves more than the {limit} bytes its repodata gives") from None
        # Checked and moved into the cache in one thread hop (each file system call on the
        # event loop held every other package's coordination: a rename here took 0.4 ms).
        with verifying():
            size = await asyncio.to_thread(_publish, tmp, path, sha, dist, hashed)
        if report is not None:  # bytes that came over the network (not from the cache)
            report.downloaded(size)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fetch_local(source: Path, path: Path, sha: str, dist: str, limit: int) -> int | None:
    """A local channel's archive into the cache (blocking): None when the cache holds it
    whole (marked used), else its size, copied and checked as a download is."""
    tmp = _cache_slot(path, sha, dist)
    if tmp is None:
        return None
    try:
        if source.stat().st_size > limit:
            raise _TooLarge
        return _publish(tmp, path, sha, dist, _copy_hashed(source, tmp))
    finally:
        tmp.unlink(missing_ok=True)


def _discard(outcome: StreamOutcome) -> None:
    """The layer file of a streamed job whose build was abandoned meanwhile."""
    outcome.blob.path.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, sha: str, dist: str, hashed: str | None) -> int:
    """Check a downloaded archive against the repodata's sha256 (hashing it unless its copy
    did) and move it into the cache, atomically: concurrent builds see a whole, verified
    file or none. Its size (blocking)."""
    actual = hashed if hashed is not None else _hash_file(tmp)
    if actual != sha:
        raise PackageError(f"{dist}: sha256 mismatch: repodata says {sha}, archive is {actual}")
    os.replace(tmp, path)
    return path.stat().st_size


def _cache_slot(path: Path, sha: str, dist: str) -> Path | None:
    """None when the cache holds the archive whole (marked used now); else a new empty
    file beside where it goes, to download into (blocking: one thread hop for what were
    several file system calls on the event loop, per package)."""
    if path.exists():
        if _hash_file(path) == sha:
            # Used now: the cache's size cap (archive_cache.py) removes the least recently used.
            os.utime(path)
            return None
        log.warning("cached archive of %s does not match its sha256; fetching it again", dist)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".download-")
    os.close(fd)
    return Path(tmp_name)


async def _inspect(record: rattler.RepoDataRecord, archive: Path, limits: PackageLimits) -> None:
    """Refuse an archive that is not the promised package, is not what it declares
    (condery/layers/members.py), or would write outside the prefix."""
    dist = dist_name(record)
    try:
        pkg = await package_streaming.PackageArchive.from_path(archive)
        index = await pkg.index_json()
        info = await pkg.read_files(["info/link.json", "info/paths.json", "info/files", "info/has_prefix"])
    except Exception as exc:
        raise PackageError(f"{dist}: not a valid conda package "
                           f"({_public_message(exc, archive.parent)})") from exc
    found = (index.name.normalized, str(index.version), str(index.build))
    expected = (record.name.normalized, str(record.version), str(record.build))
    if found != expected:
        raise PackageError(f"{dist}: the archive holds {'-'.join(found)}, not what the repodata says")
    try:
        await asyncio.to_thread(verify_archive, archive, info["info/paths.json"], info["info/files"],
                                info["info/has_prefix"], limits)
    except PackageError as exc:
        raise PackageError(f"{dist}: {exc}") from None

    entry_points: list[str] = []
    if info["info/link.json"] is not None:
        try:
            link = json.loads(info["info/link.json"])
            noarch = link.get("noarch") or {}
            entry_points = list(noarch.get("entry_points") or [])
        except (ValueError, AttributeError) as exc:
            raise PackageError(f"{dist}: unreadable info/link.json") from exc
    for ep in entry_points:
        name = ep.split("=", 1)[0].strip() if isinstance(ep, str) else ""
        if not _ENTRY_POINT_NAME.match(name) or name in (".", ".."):
            raise PackageError(f"{dist}: unsafe entry point {ep!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _public_message(exc: BaseException, *hidden: Path) -> str:
    """rattler's error, without the local directories it mentions."""
    text = _first_line(exc)
    for path in hidden:
        text = text.replace(str(path), "<local>")
    return text


# rattler reports I/O failures as text ("... (os error 28)"); these errno values mean
# the host is at fault (disk full, quota, I/O error, read-only), not the package.
_HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
_OS_ERROR_RE = re.compile(r"\(os error (\d+)\)")


# Below this much free space in the work directory, a failed install is blamed on the disk.
_LOW_SPACE = 64 << 20


def _host_fault(exc: BaseException, work_dir: Path) -> int | None:
    if isinstance(exc, OSError) and exc.errno in _HOST_ERRNOS:
        return exc.errno
    for match in _OS_ERROR_RE.finditer(str(exc)):
        if int(match.group(1)) in _HOST_ERRNOS:
            return int(match.group(1))
    # Some of rattler's errors drop the errno ("failed to create the prefix"): a disk with
    # almost nothing left is the likelier cause than the package.
    try:
        if shutil.disk_usage(work_dir).free < _LOW_SPACE:
            return errno.ENOSPC
    except OSError:
        pass
    return None


def public_channel(channel_url: str) -> str:
    """A channel as an error message may name it: no credentials, no server path."""
    if channel_url.startswith("file:"):
        return "a local channel"
    return redact_url(channel_url).rstrip("/")


def _finish_layer(record: rattler.RepoDataRecord, staging: Path, target: Path, *, prefix: str,
                  keep_unrecorded: bool, hidden: tuple[Path, ...], out_path: Path,
                  compiled: list[CompiledFile], compression: str = GZIP,
                  owner: TreeOwner | None = None) -> LayerBlob:
    """Scrub the installed tree and write the layer (blocking; run in a thread)."""
    dist = dist_name(record)
    for rel in _STAGING_ONLY:
        (target / rel).unlink(missing_ok=True)
    meta_files = sorted((target / "conda-meta").glob("*.json"))
    if [m.name for m in meta_files] != [f"{dist}.json"]:
        raise PackageError(f"{dist}: the installer wrote unexpected records {[m.name for m in meta_files]}")
    meta = meta_files[0]
    data = scrub_record(json.loads(meta.read_text()), record)
    record_compiled(data, compiled)
    # Both directories are unique to this build, so a hit is a real leak, never a channel URL.
    needles = tuple(str(p) for p in (*hidden, staging))
    if contains_path(data, needles):
        raise PackageError(f"{dist}: the conda-meta record still holds a local path")
    meta.unlink()  # may be a hardlink into rattler's cache: never write through it
    meta.write_bytes(record_bytes(data))

    if not keep_unrecorded:
        # Only what the package declares (and its record) goes into the layer.
        wanted = {str(f) for f in data.get("files", [])} | {f"conda-meta/{dist}.json"}
        softlinks = {str(e.get("_path")) for e in (data.get("paths_data") or {}).get("paths", [])
                     if isinstance(e, dict) and e.get("path_type") == "softlink"}
        _prune(target, wanted, softlinks, dist)
        del wanted, softlinks
    # The record's paths (a few hundred bytes of Python objects per file) are not needed to
    # write the layer: freed first, the peak is the larger of the two steps, not their sum.
    del data
    return write_layer(target, prefix.strip("/"), out_path, compression=compression, owner=owner)


def _prune(target: Path, wanted: set[str], softlinks: set[str], dist: str) -> None:
    """Drop what the package does not declare, in one walk of the installed tree.

    A kept symlink must be one the package declares: the archive was checked member by
    member before the install (members.py), so this second line of defence catches an
    installer that made links of its own.
    """
    for dirpath, dirnames, filenames in os.walk(target, topdown=False):
        rel_dir = os.path.relpath(dirpath, target)
        for item in (*filenames, *[d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            rel = item if rel_dir == "." else f"{rel_dir}/{item}"
            path = os.path.join(dirpath, item)
            if rel not in wanted:
                log.debug("dropping unrecorded %s", rel)
                os.unlink(path)
            elif rel not in softlinks and os.path.islink(path):
                raise PackageError(f"{dist}: the install left an undeclared symlink {rel!r}")
        if rel_dir != "." and not os.listdir(dirpath):
            os.rmdir(dirpath)


async def build_package_layer(record: rattler.RepoDataRecord, *, python_record: rattler.RepoDataRecord | None,
                              prefix: str, platform: str, work_dir: Path, package_cache_dir: Path,
                              allow_scripts: bool = False, limits: PackageLimits = PackageLimits(),
                              download_slots: asyncio.Semaphore | None = None,
                              cpu_slots: asyncio.Semaphore | PrioritySlots | None = None,
                              client: rattler.Client | None = None,
                              report: LayerReport | None = None,
                              bytecode: BytecodePlan | None = None, compression: str = GZIP,
                              stream: bool = True, owner: tuple[int, int] | None = None,
                              workers: LayerWorkers | None = None) -> LayerBlob:
    """Build the layer of one package at `prefix`; the compressed file is left in `work_dir`.

    Package scripts (post-link) run only if `allow_scripts`: they are code from the
    channel running on this host. With scripts off, the layer holds exactly the files
    the package records plus its conda-meta record. `limits` bound what the package may
    unpack to; they are checked from the archive's headers before anything is written.

    The download holds one of `download_slots` and nothing else, the rest one of
    `cpu_slots`: a slow channel then keeps many downloads in flight without taking a
    core, and a core is never held waiting for the network.

    With `bytecode` (layers/bytecode.py's bytecode_for), the package's python modules are
    compiled into the layer, under the CPU slot too.

    The layer is written straight from the archive (stream_layer.py) unless the package
    needs rattler's install; `stream=False` always installs (the tests compare the two).

    `owner` (uid, gid): everything at and below the prefix is theirs (the environment of a
    meta-package's `changeable`, which its user may change); None: root's.

    `workers` (layers/workers.py): the processes a streamed layer is written in; None: a
    thread of this process.
    """
    _check_prefix(prefix)
    dist = dist_name(record)
    noarch_python = _is_noarch_python(record)
    if noarch_python and python_record is None:
        raise PackageError(f"{dist} is a noarch: python package, but the environment has no python")
    async with download_slots or contextlib.nullcontext():
        with report.timed("fetch") if report else contextlib.nullcontext():
            archive = await fetch_verified(record, package_cache_dir, limits.max_unpacked_bytes, client, report)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = _Scratch(work_dir, f".stage-{record.name.normalized}-")
    try:
        # Largest first where the slots say so (common/slots.py): a big package does not wait
        # behind many small ones and then run alone at the end.
        taken = cpu_slots.taken(record.size or 0) if isinstance(cpu_slots, PrioritySlots) else cpu_slots
        loop = asyncio.get_running_loop()
        waiting_since = loop.time()
        async with taken or contextlib.nullcontext():
            # fetch_verified marked the archive used. A wait for the slot long enough to
            # near the archive cache's "in use" window (archive_cache.py) marks it again,
            # or fetches it again if the cache's size cap removed it meanwhile.
            if loop.time() - waiting_since > IN_USE_SECONDS / 4:
                try:
                    await asyncio.to_thread(os.utime, archive)
                except FileNotFoundError:
                    archive = await fetch_verified(record, package_cache_dir, limits.max_unpacked_bytes, client,
                                                   report)
            with report.timed("layers") if report else contextlib.nullcontext():
                return await _build_from_archive(record, archive, staging, python_record=python_record,
                                                 prefix=prefix, platform=platform, work_dir=work_dir,
                                                 package_cache_dir=Path(package_cache_dir),
                                                 allow_scripts=allow_scripts, limits=limits, report=report,
                                                 bytecode=bytecode, compression=compression, stream=stream,
                                                 owner=None if owner is None else TreeOwner(prefix.strip("/"), *owner),
                                                 workers=workers)
    finally:
        # Once the CPU slot is given back: removing the extracted package and its linked
        # copy (two entries per file) is not the next build's business. Measured with 300
        # small packages (bench_scale's 10 MB x 300), runs taken in turn: cold build 7.4 s and
        # 7.8 s with this inside the slot, 6.2 s and 6.6 s after it.
        await staging.remove()


class _Scratch:
    """A staging directory made on first use: only rattler's install needs one, and making
    and removing one per streamed package was a fixed cost of every small package."""

    def __init__(self, parent: Path, prefix: str) -> None:
        self._parent, self._prefix = parent, prefix
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = Path(tempfile.mkdtemp(dir=self._parent, prefix=self._prefix))
        return self._path

    async def remove(self) -> None:
        if self._path is not None:
            await asyncio.to_thread(shutil.rmtree, self._path, True)


async def _build_from_archive(record: rattler.RepoDataRecord, archive: Path, scratch: _Scratch, *,
                              python_record: rattler.RepoDataRecord | None, prefix: str, platform: str,
                              work_dir: Path, package_cache_dir: Path, allow_scripts: bool,
                              limits: PackageLimits, report: LayerReport | None = None,
                              bytecode: BytecodePlan | None = None, compression: str = GZIP,
                              stream: bool = True, owner: TreeOwner | None = None,
                              workers: LayerWorkers | None = None) -> LayerBlob:
    """Inspect, install into `scratch` (an empty directory the caller removes), scrub and
    tar a verified archive (the CPU-bound part)."""
    dist = dist_name(record)
    noarch_python = _is_noarch_python(record)

    def timed(step: str) -> ContextManager[None]:
        return report.timed(step) if report else contextlib.nullcontext()

    declined = ("package scripts" if allow_scripts else "noarch: python" if noarch_python
                else None if stream else "asked to")
    if declined is None:
        try:
            return await _stream_layer(record, archive, prefix=prefix, work_dir=work_dir, limits=limits,
                                       bytecode=bytecode, compression=compression, report=report, owner=owner,
                                       workers=workers)
        except NotStreamable as exc:
            declined = str(exc)
    log.debug("%s: installed with rattler: %s", dist, declined)
    staging = scratch.path

    try:
        with timed("check"):
            await _inspect(record, archive, limits)
    except PackageError:
        # Verified but unusable: keep nothing of it.
        shutil.rmtree(archive.parent, ignore_errors=True)
        raise

    fd, out_name = tempfile.mkstemp(dir=work_dir, prefix=f"{dist}-", suffix=".tar.gz")
    os.close(fd)
    out_path = Path(out_name)
    try:
        local = rattler.RepoDataRecord(record, record.file_name, archive.as_uri(), record.channel)
        records = [local]
        if noarch_python and python_record is not None:
            records.append(python_record)
        target = staging / "prefix"
        try:
            with timed("install"):
                await rattler.install(
                    records, target, cache_dir=staging / "cache", installed_packages=[],
                    ignored_packages={"python"} if len(records) > 1 else None,
                    platform=rattler.Subdir(platform), execute_link_scripts=allow_scripts,
                    show_progress=False, alternative_target_prefix=prefix,
                )
        except Exception as exc:
            log.info("install of %s failed: %s", dist, exc)
            fault = _host_fault(exc, work_dir)
            if fault is not None:
                # The host failed, not the package: a passing fault for the caller to report.
                raise OSError(fault, f"{os.strerror(fault)} while installing {dist}") from None
            raise PackageError(f"{dist}: install failed: "
                               f"{_public_message(exc, staging, work_dir, Path(package_cache_dir))}") from exc
        with timed("bytecode"):
            compiled = (await compile_bytecode(target, dist, bytecode, prefix=prefix, work_dir=staging)
                        if bytecode else [])
        with timed("pack"):
            return await asyncio.to_thread(
                _finish_layer, record, staging, target, prefix=prefix, keep_unrecorded=allow_scripts,
                hidden=(archive.parent, archive.parent.resolve(), staging.resolve()),
                out_path=out_path, compiled=compiled, compression=compression, owner=owner,
            )
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise


async def _stream_layer(record: rattler.RepoDataRecord, archive: Path, *, prefix: str, work_dir: Path,
                        limits: PackageLimits, bytecode: BytecodePlan | None, compression: str,
                        report: LayerReport | None, owner: TreeOwner | None = None,
                        workers: LayerWorkers | None = None) -> LayerBlob:
    """The layer written straight from the archive (stream_job.py), in a worker process
    when there are `workers`, else in a thread; or NotStreamable when the package needs
    rattler's install, or its verdict (the caller then installs it, and refuses it if it
    must: this path never refuses a package itself). The blob carries the package's
    activation scripts, read in the same pass."""
    job = StreamJob(PackageIdentity.of(record), archive, work_dir, prefix, limits, bytecode, compression, owner)
    try:
        if workers is None:
            outcome = await asyncio.to_thread(build_streamed, job)
        else:
            try:
                outcome = await workers.run(build_streamed, job, abandoned=_discard)
            except WorkerLost:
                outcome = await asyncio.to_thread(build_streamed, job)
    except NotStreamable as exc:
        if exc.unforeseen:
            # A package this module did not foresee (a bug of ours, not a verdict on it):
            # rattler's install gives the layer, or the refusal.
            log.warning("%s: not streamed (%s); installing it with rattler", dist_name(record), exc)
        raise
    if report is not None:
        for step, started, ended in outcome.spans:
            report.span(step, started, ended)
    return outcome.blob
