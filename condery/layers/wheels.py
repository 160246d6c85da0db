"""One wheel -> one image layer, installed as pip would install it.

Resolution (which wheels) is condery/layers/pip_resolve.py's; this module fetches a
pinned wheel and turns it into a layer:

1. fetch: the wheel goes to `<cache>/wheels/<sha256>/<file name>`, downloaded into a
   temporary file beside it (bounded in size, given up when the index sends nothing for
   DOWNLOAD_READ_TIMEOUT seconds, retried on connection failures and 5xx), hashed, and
   renamed into place only when its sha256 is the index's: nothing else is ever visible.
2. inspect: every member of the zip is checked before anything is written: a safe
   relative name (no absolute path, `..`, empty part, backslash, control character or
   OCI whiteout), a regular file (a zip can carry symlinks; wheels never do), within the
   scheme directories (the root, `<name>.dist-info/`, `<name>-<ver>.data/<scheme>/`),
   no name twice, the unpacked size and the member count under the limits; the wheel's
   RECORD must list every file with the right hash (pypa's `installer` validates it).
3. install: pypa's `installer` library writes the files into a staging tree laid out as
   the image: `<prefix>/<site_packages>` for the root, `.data/scripts` to `bin/`,
   `.data/data` to the prefix, `.data/headers` to `include/pythonX.Y/<name>/` (pip's
   scheme for a non-virtualenv prefix), entry-point scripts in `bin/` with
   `#!<prefix>/bin/python`, a RECORD and INSTALLER in the dist-info.
4. compile: layers/bytecode.py compiles the modules as it does for conda packages
   (deterministic unchecked-hash pycs, host interpreter of the image's version), and the
   pycs are added to RECORD, so `pip uninstall` and `pip check` see them.
5. tar: tarball.write_layer writes the staged prefix as a reproducible layer.

INSTALLER says `condery`: PEP 376/627 ask for the name of the tool that installed the
distribution, and that is condery (through `installer`), not pip; `pip list`,
`pip check`, `importlib.metadata` and `pip uninstall` read RECORD and METADATA and do not
care, while a person asking "who put this here" gets the true answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import io
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiohttp
import installer
import installer.destinations
import installer.exceptions
import installer.sources
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from condery.common.redact import redact_url
from condery.layers import LayerBlob, PackageError
from condery.layers.bytecode import BytecodePlan, CompiledFile, compile_bytecode
from condery.layers.members import PackageLimits
from condery.layers.package_layer import DOWNLOAD_READ_TIMEOUT, DOWNLOAD_RETRY_DELAYS, _hash_file
from condery.layers.pip_resolve import (
    PinnedWheel,
    PipError,
    PipTarget,
    PipUnavailable,
    provided_by_conda,
    resolve_wheels,
)
from condery.layers.tarball import TreeOwner, check_member_name, write_layer

__all__ = [
    "INSTALLER_NAME", "WHEEL_INSTALLER_ID", "WHEEL_LAYOUT", "PinnedWheel", "PipError", "PipTarget",
    "PipUnavailable", "build_wheel_layer", "fetch_wheel", "provided_by_conda", "resolve_wheels",
]

log = logging.getLogger(__name__)

# Bump when the layer of the same wheel changes (scheme, RECORD, scripts...).
WHEEL_LAYOUT = "v1"
# The entry-point script template is installer's: another version may write other bytes.
WHEEL_INSTALLER_ID = f"installer-{installer.__version__}"
INSTALLER_NAME = "condery"
_SCHEMES = ("purelib", "platlib", "scripts", "headers", "data")
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+!-]*\.whl$")
_CHUNK = 1 << 20


class _TooLarge(Exception):
    pass


def _public_source(url: str) -> str:
    return "a local index" if url.startswith("file:") else redact_url(url).split("?", 1)[0]


async def _download(url: str, dest: Path, max_bytes: int) -> None:
    """`url` to `dest`, stopped past `max_bytes`; aiohttp's errors are left to the caller."""
    parsed = urlsplit(url)
    if parsed.scheme == "file":
        source = Path(unquote(parsed.path))
        if source.stat().st_size > max_bytes:
            raise _TooLarge
        await asyncio.to_thread(shutil.copyfile, source, dest)
        return
    if parsed.scheme not in ("http", "https"):
        raise PipError(f"unsupported wheel URL scheme {parsed.scheme!r}")
    # No total time: a big wheel on a slow but live link is fine; a stall is not.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=DOWNLOAD_READ_TIMEOUT, sock_read=DOWNLOAD_READ_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session, session.get(url) as response:
        response.raise_for_status()
        if response.content_length is not None and response.content_length > max_bytes:
            raise _TooLarge
        size = 0
        with open(dest, "wb") as out:  # noqa: ASYNC230 - a local file, written a chunk at a time
            async for chunk in response.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise _TooLarge
                out.write(chunk)


async def _download_with_retries(wheel: PinnedWheel, dest: Path, max_bytes: int) -> None:
    source = _public_source(wheel.url)
    for attempt, delay in enumerate((*DOWNLOAD_RETRY_DELAYS, None), start=1):
        try:
            await _download(wheel.url, dest, max_bytes)
            return
        except (PipError, _TooLarge):
            raise
        except FileNotFoundError:
            raise PipUnavailable(f"{wheel.filename}: not found in {source}") from None
        except aiohttp.ClientResponseError as exc:
            if exc.status < 500 or delay is None:
                raise PipUnavailable(f"{wheel.filename}: {source} answered HTTP {exc.status}") from None
            log.info("download of %s answered HTTP %d; attempt %d in %.1f s",
                     wheel.filename, exc.status, attempt + 1, delay)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if delay is None:
                log.warning("download of %s from %s failed after %d attempts: %s",
                            wheel.filename, source, attempt, type(exc).__name__)
                raise PipUnavailable(f"{wheel.filename}: download failed from {source}") from None
            log.info("download of %s failed (%s); attempt %d in %.1f s",
                     wheel.filename, type(exc).__name__, attempt + 1, delay)
        dest.unlink(missing_ok=True)
        await asyncio.sleep(delay)


def _check_pin(wheel: PinnedWheel) -> None:
    if not _WHEEL_NAME.match(wheel.filename) or "/" in wheel.filename:
        raise PipError(f"unexpected wheel file name {wheel.filename!r}")
    if not re.fullmatch(r"[0-9a-f]{64}", wheel.sha256):
        raise PipError(f"{wheel.filename}: the index gives no valid sha256")


async def fetch_wheel(wheel: PinnedWheel, cache_dir: Path, *, max_bytes: int) -> Path:
    """The verified wheel file (sha256 checked), cached under cache_dir/wheels/<sha256>/.

    Atomic: the download goes to a temporary file in that directory and is renamed into
    place once verified, so no half-written or wrong file is ever visible; a refused
    download leaves nothing behind. Raises PipError (more than `max_bytes`, a sha256
    mismatch) or PipUnavailable (the index cannot be read now)."""
    _check_pin(wheel)
    directory = Path(cache_dir) / "wheels" / wheel.sha256
    path = directory / wheel.filename
    if path.exists():
        if await asyncio.to_thread(_hash_file, path) == wheel.sha256:
            await asyncio.to_thread(os.utime, path)
            return path
        log.warning("cached %s does not match its sha256; fetching it again", wheel.filename)
        path.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".download-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            await _download_with_retries(wheel, tmp, max_bytes)
        except _TooLarge:
            raise PipError(f"{wheel.filename}: larger than the {max_bytes} bytes a package may have") from None
        actual = await asyncio.to_thread(_hash_file, tmp)
        if actual != wheel.sha256:
            raise PipError(f"{wheel.filename}: sha256 mismatch: the index says {wheel.sha256}, the file is {actual}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty: a refused download leaves no directory either
    return path


def _inspect(wheel_path: Path, wheel: PinnedWheel, limits: PackageLimits) -> None:
    """Refuse a wheel that is not the pinned one or would write anything but its files
    into the scheme directories (see the module docstring)."""
    try:
        name, version, _, _ = parse_wheel_filename(wheel.filename)
    except InvalidWheelFilename:
        raise PipError(f"unexpected wheel file name {wheel.filename!r}") from None
    if canonicalize_name(name) != canonicalize_name(wheel.name) or str(version) != wheel.version:
        raise PipError(f"{wheel.filename} is not {wheel.name} {wheel.version}")
    try:
        zf = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError):
        raise PipError(f"{wheel.filename}: not a valid wheel (zip)") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_files:
            raise PipError(f"{wheel.filename}: more than {limits.max_files} files")
        total, seen, dist_infos = 0, set(), set()
        for info in infos:
            member = info.filename
            is_dir = member.endswith("/")
            rel = member.rstrip("/")
            try:
                if "\\" in member:
                    raise PackageError(f"unsafe path in wheel: {member!r}")
                check_member_name(rel)
            except PackageError as exc:
                raise PipError(f"{wheel.filename}: {exc}") from None
            if rel in seen:
                raise PipError(f"{wheel.filename}: {rel!r} is in the wheel twice")
            seen.add(rel)
            # Some build backends (hatchling) write permission bits without a file type:
            # only a type that is there and is not a regular file (or a directory) is refused.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind and not (kind == stat.S_IFREG or (is_dir and kind == stat.S_IFDIR)):
                raise PipError(f"{wheel.filename}: {rel!r} is not a regular file")
            top, _, below = rel.partition("/")
            if top.endswith(".dist-info"):
                dist_infos.add(top)
            elif top.endswith(".data") and below and not is_dir:
                scheme, _, inside = below.partition("/")
                if scheme not in _SCHEMES or not inside:
                    raise PipError(f"{wheel.filename}: {rel!r} is outside the install scheme's directories")
            total += info.file_size
            if total > limits.max_unpacked_bytes:
                raise PipError(f"{wheel.filename}: unpacks to more than {limits.max_unpacked_bytes} bytes")
        if len(dist_infos) != 1:
            raise PipError(f"{wheel.filename}: a wheel has exactly one .dist-info directory")
        try:
            source = installer.sources.WheelFile(zf)
            source.validate_record(validate_contents=True)
        except (ValueError, KeyError, zipfile.BadZipFile, installer.exceptions.InstallerError) as exc:
            issue = getattr(exc, "issues", None) or [str(exc)]
            text = str(issue[0]).replace(str(wheel_path), wheel.filename)
            raise PipError(f"{wheel.filename}: its RECORD does not match its files ({text})") from None


def _scheme_dict(target: PipTarget, name: str) -> dict[str, str]:
    prefix = target.prefix.rstrip("/")
    site = f"{prefix}/{target.site_packages.strip('/')}"
    return {
        "purelib": site,
        "platlib": site,
        "scripts": f"{prefix}/bin",
        "data": prefix,
        "headers": f"{prefix}/include/python{target.python}/{name}",
    }


def _install(wheel_path: Path, wheel: PinnedWheel, target: PipTarget, root: Path) -> str:
    """Install into `root` (the image's `/`); the dist-info directory's name."""
    destination = installer.destinations.SchemeDictionaryDestination(
        scheme_dict=_scheme_dict(target, wheel.name),
        interpreter=f"{target.prefix.rstrip('/')}/bin/python",
        script_kind="posix",
        destdir=str(root),
    )
    try:
        with installer.sources.WheelFile.open(wheel_path) as source, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # __pycache__ in a wheel: skipped, as pip does
            installer.install(source, destination, {"INSTALLER": f"{INSTALLER_NAME}\n".encode()})
            return source.dist_info_dir
    except (ValueError, KeyError, FileExistsError, zipfile.BadZipFile, installer.exceptions.InstallerError) as exc:
        text = str(exc).replace(str(root), "").replace(str(wheel_path), wheel.filename)
        raise PipError(f"{wheel.filename}: cannot be installed: {text}") from None


def _installed_files(prefix_dir: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(prefix_dir):
        rel_dir = os.path.relpath(dirpath, prefix_dir)
        for item in (*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))):
            files.append(item if rel_dir == "." else f"{rel_dir}/{item}")
    return sorted(files)


def _b64_sha256(hex_digest: str) -> str:
    return "sha256=" + base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode()


def _record_compiled(site_dir: Path, dist_info: str, site_packages: str, compiled: list[CompiledFile]) -> None:
    """Add the pycs to the dist-info's RECORD (paths relative to site-packages, as pip writes)."""
    if not compiled:
        return
    record_path = site_dir / dist_info / "RECORD"
    own = f"{dist_info}/RECORD"
    rows = list(csv.reader(io.StringIO(record_path.read_text(encoding="utf-8"))))
    rows = [row for row in rows if row and row[0] != own]
    for c in sorted(compiled, key=lambda c: c.path):
        rows.append([posixpath.relpath(c.path, site_packages), _b64_sha256(c.sha256), str(c.size)])
    rows.append([own, "", ""])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    record_path.unlink()
    record_path.write_text(out.getvalue(), encoding="utf-8")


async def build_wheel_layer(wheel_path: Path, wheel: PinnedWheel, target: PipTarget, out_path: Path, *,
                            compression: str, bytecode: BytecodePlan | None,
                            limits: PackageLimits, owner: tuple[int, int] | None = None) -> LayerBlob:
    """The layer of the installed wheel, written to `out_path` (with `owner` (uid, gid), the
    prefix's entries theirs: package_layer.build_package_layer's).

    Async (unlike the brief's sync sketch) because bytecode.compile_bytecode is: the
    inspection, install and tar run in threads, the compiler in a child process. The
    staging directory is made beside `out_path` and removed at the end. Raises PipError
    for a wheel that cannot be installed safely."""
    if not target.prefix.startswith("/"):
        raise ValueError(f"prefix must be an absolute path, not {target.prefix!r}")
    check_member_name(target.prefix.strip("/"))
    check_member_name(target.site_packages.strip("/"))
    out_path = Path(out_path)
    await asyncio.to_thread(_inspect, wheel_path, wheel, limits)
    staging = Path(tempfile.mkdtemp(dir=out_path.parent, prefix=f".stage-wheel-{wheel.name}-"))
    try:
        root = staging / "root"
        prefix_dir = root / target.prefix.strip("/")
        dist_info = await asyncio.to_thread(_install, wheel_path, wheel, target, root)
        if (prefix_dir / "conda-meta").exists():
            raise PipError(f"{wheel.filename}: writes into conda-meta/, conda's own records")
        compiled: list[CompiledFile] = []
        if bytecode is not None:
            # compile_bytecode reads the file list from a conda-meta record: give it one for
            # the time of the compile (the check above keeps the wheel's own files out of there).
            dist = f"pip-{wheel.name}"
            meta = prefix_dir / "conda-meta" / f"{dist}.json"
            meta.parent.mkdir()
            meta.write_text(json.dumps({"files": await asyncio.to_thread(_installed_files, prefix_dir)}))
            try:
                compiled = await compile_bytecode(prefix_dir, dist, bytecode, prefix=target.prefix, work_dir=staging)
            except PackageError as exc:
                raise type(exc)(str(exc).replace(dist, wheel.filename)) from None
            finally:
                shutil.rmtree(meta.parent)
        site = target.site_packages.strip("/")
        await asyncio.to_thread(_record_compiled, prefix_dir / site, dist_info, site, compiled)
        try:
            prefix = target.prefix.strip("/")
            return await asyncio.to_thread(write_layer, prefix_dir, prefix, out_path, compression=compression,
                                           owner=None if owner is None else TreeOwner(prefix, *owner))
        except PackageError as exc:
            raise PipError(f"{wheel.filename}: {exc}") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
