"""What a base image's layers hold that condery needs: each layer's diff_id, the glibc
version (for the solver's `__glibc` virtual package) and the accounts (/etc/passwd,
/etc/group) an image with a user of its own keeps. Runs in a worker thread.

Each layer's tar stream is read once, in order; the last layer with evidence wins.
glibc evidence, strongest first: the dpkg record of `libc6` (`var/lib/dpkg/status` or
distroless `status.d/`), the "GNU C Library ... version X.Y" banner inside `libc.so.6`,
and a versioned file name `libc-X.Y.so` / `ld-X.Y.so` (glibc before 2.34). None when
nothing is found (musl, scratch, busybox). The layers are untrusted: extended headers,
member reads and the unpacked size are bounded, and anything unreadable is a
ManifestError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Mapping

import zstandard

from condery.layers.compression import open_decompressed
from condery.oci.manifest import ManifestError

# What one base may unpack to: a bound for a hostile or broken base, never for one an
# operator chose (the largest real bases, CUDA devel images, unpack to tens of GB).
MAX_BASE_UNPACKED_SIZE = 64 << 30


@dataclass(frozen=True)
class LayerScan:
    diff_id: str  # sha256 of the uncompressed tar
    glibc_version: str | None
    size: int = 0  # bytes of the uncompressed tar
    # "passwd"/"group" -> the layer's etc/passwd or etc/group text, None where it whites it out
    accounts: Mapping[str, str | None] = dataclasses.field(default_factory=dict)


_LIBC_SO = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?libc\.so\.6$")
_VERSIONED_LIB = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?(?:libc|ld)-(\d+\.\d+)\.so$")
_VERSIONED_TARGET = re.compile(r"(?:^|/)(?:libc|ld)-(\d+\.\d+)\.so$")
_LD_SO = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/]+/)?ld-linux[^/]*\.so\.\d$")
_DPKG_STATUS = re.compile(r"^var/lib/dpkg/(?:status|status\.d/[^/]+)$")
_BANNER = re.compile(rb"GNU C Library [^\n]{0,200}?version (\d+\.\d+)")
_MAX_LIBC_READ = 32 << 20
_MAX_STATUS_READ = 64 << 20
_ACCOUNT_FILES = {"etc/passwd": "passwd", "etc/group": "group"}
# OCI whiteouts that remove them: the file's own, or all of etc below this layer (opaque).
_ACCOUNT_WHITEOUTS = {"etc/.wh.passwd": ("passwd",), "etc/.wh.group": ("group",),
                      "etc/.wh..wh..opq": ("passwd", "group"), ".wh.etc": ("passwd", "group")}
_MAX_ACCOUNTS_READ = 1 << 20  # a passwd of 10,000 users is ~600 KB
# tarfile reads a pax or GNU long-name header whole into memory, however large it says
# it is; real ones are a few hundred bytes (xattrs included).
_MAX_TAR_HEADER = 1 << 20
# What a hostile layer stream can raise besides our own ManifestError: tar, gzip
# (zlib.error is not an OSError), zstd, and a chain of extended headers deep enough to
# exhaust the recursion tarfile reads them with.
STREAM_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError, RecursionError)


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)
        if self.type in extended and self.size > _MAX_TAR_HEADER:
            raise ManifestError(f"layer has a {self.size} byte extended tar header")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _HashingReader:
    """A read-only stream that hashes what passes through it, up to `limit` bytes."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self.raw = raw
        self.hasher = hashlib.sha256()
        self.size = 0
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.size += len(data)
        if self.size > self.limit:
            raise ManifestError(f"the base image unpacks to more than {self.limit} bytes")
        self.hasher.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return "sha256:" + self.hasher.hexdigest()


def _dpkg_libc6_version(text: str) -> str | None:
    for stanza in text.split("\n\n"):
        fields = dict(
            line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith(" ")
        )
        if fields.get("Package", "").strip() == "libc6" and "installed" in fields.get("Status", "installed"):
            match = re.match(r"^(?:\d+:)?(\d+\.\d+)", fields.get("Version", "").strip())
            if match:
                return match.group(1)
    return None


def scan_layer(path: Path, limit: int = MAX_BASE_UNPACKED_SIZE) -> LayerScan:
    """Hash a layer's uncompressed tar (at most `limit` bytes of it) and look for the
    glibc version it carries. Anything unreadable is a ManifestError."""
    dpkg = banner = filename = None
    accounts: dict[str, str | None] = {}
    with open(path, "rb") as handle:
        reader = _HashingReader(open_decompressed(handle), limit)
        try:
            with tarfile.open(fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo) as tar:  # type: ignore[call-overload]
                for member in tar:
                    name = member.name.lstrip("/").removeprefix("./")
                    if member.isfile() and _DPKG_STATUS.match(name) and member.size <= _MAX_STATUS_READ:
                        text = _read_member(tar, member).decode("utf-8", "replace")
                        dpkg = _dpkg_libc6_version(text) or dpkg
                    elif _LIBC_SO.match(name) and member.isfile() and member.size <= _MAX_LIBC_READ:
                        found = _BANNER.search(_read_member(tar, member))
                        banner = found.group(1).decode() if found else banner
                    elif (versioned := _VERSIONED_LIB.match(name)) and member.isfile():
                        filename = versioned.group(1)
                    elif (_LIBC_SO.match(name) or _LD_SO.match(name)) and member.issym():
                        target = _VERSIONED_TARGET.search(member.linkname)
                        filename = target.group(1) if target else filename
                    elif name in _ACCOUNT_FILES:
                        # This layer's file replaces the lower layers'; one we will not read
                        # (a link, or over the bound) counts as absent, never as theirs.
                        readable = member.isfile() and member.size <= _MAX_ACCOUNTS_READ
                        accounts[_ACCOUNT_FILES[name]] = (
                            _read_member(tar, member).decode("utf-8", "replace") if readable else None)
                    elif name in _ACCOUNT_WHITEOUTS:
                        for kind in _ACCOUNT_WHITEOUTS[name]:  # hides lower layers' only, not this one's
                            accounts.setdefault(kind, None)
            diff_id = reader.drain()
        except ManifestError:
            raise
        except STREAM_ERRORS as exc:
            raise ManifestError(f"layer is not a readable tar stream: {exc}") from None
    return LayerScan(diff_id, dpkg or banner or filename, reader.size, accounts)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = tar.extractfile(member)
    return extracted.read() if extracted is not None else b""
