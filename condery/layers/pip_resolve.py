"""An environment's `pip:` requirements -> the wheels to install, pinned by sha256.

The resolver is uv's (`uv pip compile`, run as a child process): a maintained PEP 440 /
PEP 508 resolver with the simple index client (PEP 503 HTML, PEP 691 JSON, PEP 658
metadata, PEP 700 upload times) it needs, and the three switches this contract asks for:
`--only-binary :all:` (an sdist would run its build code on this host), a target
interpreter and platform that need not be the host's (`--python-version`,
`--python-platform x86_64-manylinux_2_28`), and `--exclude-newer` (snapshots, by upload
time). It writes a PEP 751 lock (`--format pylock.toml`) naming each wheel's URL and
sha256, so nothing here parses an index or evaluates a marker.

What conda already installed: each python package conda provides is offered to uv as a
stub wheel `<name>-<version>+conda-py3-none-any.whl` (METADATA with no Requires-Dist:
conda has installed its dependencies already) in a `--find-links` directory, and
constrained to exactly that version (`-c`: `name==<version>+conda`). The local version
label keeps the index's own file of the same version out (PEP 440: `==1.26.4+conda` matches
nothing else), while `numpy>=1.20` or `numpy==1.26.4` still accept it. So a requirement
conda satisfies resolves to the stub, which is dropped from the result (never downloaded,
never installed again), and one conda cannot satisfy fails the resolution with uv's reason
("you require numpy<1.20 and numpy==1.26.4 (installed by conda)"). The index need not
carry the conda versions at all. find-links files have no upload time, and uv does not
apply `--exclude-newer` to them, so a snapshot never hides what conda installed.

The child gets a minimal environment (no credentials of the server's, no uv configuration
files: `--no-config`, no cache: `--no-cache`, no python downloads), an empty working
directory, a time limit, and dies with the server (condery/common/children.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import rattler
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from condery.common.children import spawn, stop
from condery.common.redact import redact_text, redact_url
from condery.layers import PackageError, PackageUnavailable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

# The local version label of the stub wheels standing for conda's packages.
CONDA_LOCAL = "conda"
# uv's own retries of a failed request (connection refused, 5xx), and its per-request
# read timeout in seconds; the whole resolution is bounded by resolve_wheels' timeout.
UV_HTTP_RETRIES = 2
UV_HTTP_TIMEOUT = 60
# The manylinux levels `uv --python-platform` knows, per architecture (uv 0.13).
_UV_GLIBC_MINORS = (17, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40)
_ARCH = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}
# Passed through to uv: how this host reaches an index (a proxy, a private CA), never a credential of ours.
_PASSED_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
               "http_proxy", "https_proxy", "no_proxy", "all_proxy")
# uv's messages when the index, not the request, is at fault.
_UNAVAILABLE = re.compile(
    r"Failed to fetch|error sending request|Connection refused|connection reset|timed out|"
    r"dns error|failed to lookup address|HTTP status server error|Request failed after|"
    r"\b(401|403|407) (Unauthorized|Forbidden|Proxy)",
    re.IGNORECASE,
)
_STUB_DATE = (1980, 1, 1, 0, 0, 0)


class PipError(PackageError):
    """The pip requirements cannot be installed (no wheel, a conflict, a bad requirement).

    The message is shown to the client: it names the requirement and the reason, never a
    server path or a credential."""


class PipUnavailable(PipError, PackageUnavailable):
    """The index cannot be read right now (unreachable, timeout, refused): a passing fault."""


@dataclass(frozen=True)
class PipTarget:
    python: str  # "3.11": the image's python major.minor
    subdir: str  # conda subdir, "linux-64" or "linux-aarch64"
    glibc: str | None  # base image glibc "2.36" -> manylinux_2_36 and below; None -> 2.17
    prefix: str  # "/opt/conda"
    site_packages: str  # "lib/python3.11/site-packages"
    exclude_newer: datetime | None = None


@dataclass(frozen=True)
class PinnedWheel:
    name: str  # canonical PyPI name
    version: str
    filename: str  # the .whl file name
    url: str  # where to fetch it (may carry index credentials: never log/show it unredacted)
    sha256: str


def provided_by_conda(records: Sequence[rattler.RepoDataRecord]) -> dict[str, str]:
    """canonical PyPI name -> version, for the conda packages that are python packages:
    `noarch: python` ones and those that depend on python (python itself excepted)."""
    provided: dict[str, str] = {}
    for record in records:
        name = record.name.normalized
        if name == "python":
            continue
        if record.noarch.python or any(str(dep).split(" ", 1)[0] == "python" for dep in record.depends):
            provided[canonicalize_name(name)] = str(record.version)
    return provided


def public_index(index_url: str) -> str:
    """The index as a message may name it: no credentials, no server path."""
    if index_url.startswith("file:"):
        return "a local index"
    return redact_url(index_url).rstrip("/")


def _python_version(target: PipTarget) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)", target.python)
    if not match:
        raise ValueError(f"python must be MAJOR.MINOR, not {target.python!r}")
    return int(match.group(1)), int(match.group(2))


def _glibc_minor(target: PipTarget) -> int:
    if target.glibc is None:
        return 17
    match = re.fullmatch(r"2\.(\d+)", target.glibc)
    if not match:
        raise PipError(f"pip packages need a glibc base image; this one has glibc {target.glibc!r}")
    minor = int(match.group(1))
    if minor < 17:
        raise PipError(f"pip packages need glibc 2.17 or later (manylinux2014); the base image has {target.glibc}")
    return minor


def _arch(target: PipTarget) -> str:
    arch = _ARCH.get(target.subdir)
    if arch is None:
        raise PipError(f"pip packages are not supported for the platform {target.subdir}")
    return arch


def uv_platform(target: PipTarget) -> str:
    """`--python-platform`: the highest manylinux level uv knows that the base's glibc runs."""
    minor = _glibc_minor(target)
    level = max(m for m in _UV_GLIBC_MINORS if m <= minor)
    return f"{_arch(target)}-manylinux_2_{level}"


def target_tags(target: PipTarget) -> list[Tag]:
    """The wheel tags the image's python accepts, best first (as pip ranks them)."""
    major, minor = _python_version(target)
    arch, glibc = _arch(target), _glibc_minor(target)
    platforms = []
    for m in range(glibc, 4, -1):
        platforms.append(f"manylinux_2_{m}_{arch}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(m)
        if legacy and (arch == "x86_64" or legacy == "manylinux2014"):
            platforms.append(f"{legacy}_{arch}")
    version = (major, minor)
    return [*cpython_tags(version, platforms=platforms),
            *compatible_tags(version, interpreter=f"cp{major}{minor}", platforms=platforms)]


def check_requirements(requirements: Sequence[str]) -> list[Requirement]:
    """Each entry a PEP 508 requirement on a named project of the index (no URL, no pip option)."""
    parsed = []
    for text in requirements:
        if not isinstance(text, str) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise PipError(f"pip requirement {text!r} is not a single line")
        stripped = text.strip()
        if stripped.startswith("-"):
            raise PipError(f"pip requirement {redact_text(stripped)!r}: pip options are not supported, "
                           "only requirements (the index is the server's pypi_index)")
        try:
            req = Requirement(stripped)
        except InvalidRequirement as exc:
            raise PipError(f"pip requirement {redact_text(stripped)!r} is invalid: {redact_text(str(exc))}") from None
        if req.url:
            raise PipError(f"pip requirement {req.name!r}: direct URLs are not supported, "
                           "only packages from the index")
        parsed.append(req)
    return parsed


def _stub_version(version: str) -> str | None:
    try:
        parsed = Version(version)
    except InvalidVersion:
        return None
    return f"{parsed.public}+{CONDA_LOCAL}"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_stub_wheel(directory: Path, name: str, version: str) -> Path:
    """A wheel with metadata only, standing for the conda package `name` `version`."""
    stem = f"{name.replace('-', '_')}-{version}"
    dist_info = f"{stem}.dist-info"
    files = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: condery\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    path = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(zipfile.ZipInfo(member, _STUB_DATE), data)
    return path


def _child_env(scratch: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch / "home"),
        "TMPDIR": str(scratch / "tmp"),
        "LC_ALL": "C.UTF-8",
        "NO_COLOR": "1",
        "UV_NO_CACHE": "1",
        "UV_PYTHON_DOWNLOADS": "never",
        "UV_HTTP_RETRIES": str(UV_HTTP_RETRIES),
        "UV_HTTP_TIMEOUT": str(UV_HTTP_TIMEOUT),
        "UV_NO_PROGRESS": "1",
    }
    for name in _PASSED_ENV:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _uv_binary() -> str:
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        if found is None:
            raise PipUnavailable("pip requirements cannot be resolved on this server (uv is not installed)") from None
        return found
    return str(find_uv_bin())


def _exclude_newer(when: datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uv_message(stderr: str, *hidden: str) -> str:
    """uv's error, on one line, without local paths or credentials, conda's stubs named as such."""
    lines = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line or line.startswith(("warning:", "Resolved ", "hint:")):
            continue
        for prefix in ("error:", "cause:", "╰─▶"):
            if line.startswith(prefix):
                line = line[len(prefix):].strip()
        lines.append(line)
    text = " ".join(lines) or "uv failed without saying why"
    for path in sorted(hidden, key=len, reverse=True):
        if path:
            text = text.replace(path, "<local>")
    text = re.sub(r"==([0-9A-Za-z.!+_-]+?)\+" + CONDA_LOCAL + r"\b", r"==\1 (installed by conda)", text)
    text = re.sub(r"([0-9A-Za-z.!_-]+)\+" + CONDA_LOCAL + r"\b", r"\1 (installed by conda)", text)
    return redact_text(text)


def _with_index_credentials(url: str, index_url: str) -> str:
    """uv leaves credentials out of its lock: a file on the index's host gets the index's back."""
    index, file = urlsplit(index_url), urlsplit(url)
    if not index.username or file.username or (file.scheme, file.hostname, file.port) != (
            index.scheme, index.hostname, index.port):
        return url
    return urlunsplit(file._replace(netloc=index.netloc))


def _pick_wheel(package: Mapping[str, Any], tags: list[Tag], index_url: str) -> PinnedWheel:
    name = canonicalize_name(str(package.get("name", "")))
    version = str(package.get("version", ""))
    rank = {tag: i for i, tag in enumerate(tags)}
    best: tuple[int, PinnedWheel] | None = None
    for wheel in package.get("wheels") or []:
        url = str(wheel.get("url") or "")
        filename = str(wheel.get("name") or unquote(urlsplit(url).path.rsplit("/", 1)[-1]))
        sha = str((wheel.get("hashes") or {}).get("sha256") or "").lower()
        try:
            w_name, w_version, _, w_tags = parse_wheel_filename(filename)
        except InvalidWheelFilename:
            continue
        if w_name != name or str(w_version) != version or not re.fullmatch(r"[0-9a-f]{64}", sha) or not url:
            continue
        score = min((rank[t] for t in w_tags if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, PinnedWheel(name, version, filename, _with_index_credentials(url, index_url), sha))
    if best is None:
        raise PipError(f"pip package {name}=={version}: the index has no wheel with a sha256 for this "
                       "python and platform (sdists are not built)")
    return best[1]


async def resolve_wheels(requirements: Sequence[str], target: PipTarget, provided: Mapping[str, str],
                         index_url: str, *, timeout: float, work_dir: Path) -> list[PinnedWheel]:
    """Pins for the requirements (install order irrelevant), without those conda provides.

    Raises PipError (no wheel, a conflict with conda's packages or among the requirements,
    a bad requirement) or PipUnavailable (the index unreachable, refused, too slow)."""
    reqs = check_requirements(requirements)
    if not reqs:
        return []
    major, minor = _python_version(target)
    platform, tags = uv_platform(target), target_tags(target)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=work_dir, prefix=".pip-resolve-"))
    try:
        for sub in ("home", "tmp", "cwd", "stubs"):
            (scratch / sub).mkdir()
        constraints = []
        for name, conda_version in sorted(provided.items()):
            stub = _stub_version(conda_version)
            if stub is None:
                log.info("conda's %s %s has no PEP 440 version: pip requirements may install it again",
                         name, conda_version)
                continue
            write_stub_wheel(scratch / "stubs", canonicalize_name(name), stub)
            constraints.append(f"{canonicalize_name(name)}=={stub}\n")
        (scratch / "constraints.txt").write_text("".join(constraints))
        (scratch / "requirements.in").write_text("".join(f"{r}\n" for r in reqs))
        argv = [
            _uv_binary(), "pip", "compile", "--no-config", "--no-cache", "--quiet", "--no-header",
            "--python", sys.executable, "--python-version", f"{major}.{minor}", "--python-platform", platform,
            "--only-binary", ":all:", "--default-index", index_url, "--find-links", str(scratch / "stubs"),
            "--constraints", str(scratch / "constraints.txt"), "--format", "pylock.toml",
            "--output-file", str(scratch / "pylock.toml"), str(scratch / "requirements.in"),
        ]
        if target.exclude_newer is not None:
            argv[3:3] = ["--exclude-newer", _exclude_newer(target.exclude_newer)]
        log.debug("resolving pip requirements: %s", redact_text(" ".join(argv)))
        hidden = (str(scratch), str(scratch.resolve()), _local_index_path(index_url))
        proc = await spawn(*argv, cwd=scratch / "cwd", env=_child_env(scratch), stdin=asyncio.subprocess.DEVNULL,
                           stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            _, stderr_bytes = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            raise PipUnavailable(f"resolving the pip requirements against {public_index(index_url)} took longer "
                                 f"than {timeout:.0f} s") from None
        finally:
            await stop(proc)
        stderr = stderr_bytes.decode("utf-8", "replace")
        if proc.returncode != 0:
            message = _uv_message(stderr, *hidden)
            log.info("uv pip compile failed (exit %s): %s", proc.returncode, message)
            if "No solution found" not in stderr and _UNAVAILABLE.search(stderr):
                raise PipUnavailable(f"the pip index {public_index(index_url)} cannot be read: {message}")
            raise PipError(f"pip requirements cannot be installed: {message}")
        try:
            lock = tomllib.loads((scratch / "pylock.toml").read_text())
        except (OSError, ValueError) as exc:
            raise PipError(f"pip requirements: the resolver wrote no readable lock ({type(exc).__name__})") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)

    pinned = []
    for package in lock.get("packages") or []:
        name = canonicalize_name(str(package.get("name", "")))
        version = str(package.get("version", ""))
        if name in provided and Version(version).local == CONDA_LOCAL:
            continue  # conda's: installed already
        pinned.append(_pick_wheel(package, tags, index_url))
    return sorted(pinned, key=lambda w: w.name)


def _local_index_path(index_url: str) -> str:
    parsed = urlsplit(index_url)
    return unquote(parsed.path) if parsed.scheme == "file" else ""
