"""Environment files: what an `environment.yml`, a conda-lock file or an `@EXPLICIT` lock
says, read strictly into one normalized `Environment`. Pure: no I/O, no configuration.

    environment.yml     name, channels, dependencies (conda's own spec syntax, a `pip:`
                        list), variables; `prefix` (what `conda env export` writes) is
                        ignored, any other key is an error
    conda-lock.yml      the unified format (version 1): conda and pip packages pinned
                        by URL and hash, per platform
    @EXPLICIT           `conda list --explicit [--sha256]`: one platform's URLs and hashes

The id is a hash of the normalized content: comments, key order, whitespace, the order
of dependencies and the spelling of a spec (`numpy>=1.26`, `numpy >=1.26`) do not change
it, so the same file always gives the same name (`env/<id>`). A lock's id covers only
its packages (URL and hash per platform, and its pip wheels): the conda-lock file read
back from a lock's image is the same lock, hence the same name and the same image.

Files are untrusted: a bounded size, no YAML aliases (the "billion laughs" bomb expands
aliases), bounded nesting, bounded counts; every problem is an EnvironmentFileError that
names the line.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import rattler
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from condery.common.redact import redact_url

MAX_FILE_BYTES = 1 << 20  # a 500-package lock is ~150 KB
MAX_DEPTH = 16
MAX_DEPENDENCIES = 1000
MAX_PIP = 300
MAX_VARIABLES = 200
MAX_LOCKED = 5000  # packages of a lock, all platforms together
ID_LENGTH = 32  # hex digits of the sha256 of the normalized content
ENV_KEYS = ("name", "channels", "dependencies", "variables", "prefix")
# Set by activation itself: a file that set them would break the environment.
RESERVED_VARIABLES = frozenset({"PATH", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_SHLVL"})
_VARIABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_MD5_RE = re.compile(r"[0-9a-f]{32}")
_SUBDIR_RE = re.compile(r"(noarch|[a-z0-9]+-[a-z0-9_]+)")
_ARCHIVE_SUFFIXES = (".conda", ".tar.bz2")


class EnvironmentFileError(ValueError):
    """The file cannot be an environment; the message names the line and the problem."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True)
class LockedPackage:
    """One conda package of a lock: an archive by URL and hash."""

    url: str  # without credentials (the reader's own come from the registry's auth file)
    subdir: str  # the URL's subdir: a platform's or noarch
    file_name: str
    sha256: str | None  # hex; conda's default explicit lock gives md5 only
    md5: str | None

    def as_json(self) -> dict[str, Any]:
        # md5 only where there is no sha256: an explicit lock (sha256) and a conda-lock file
        # (both) of the same packages are one lock.
        return {"url": self.url, "sha256": self.sha256} if self.sha256 else {"url": self.url, "md5": self.md5}


@dataclass(frozen=True)
class LockedWheel:
    """One pip package of a lock: a wheel by URL and sha256."""

    name: str  # canonical PyPI name
    version: str
    url: str
    sha256: str

    @property
    def filename(self) -> str:
        return unquote(urlsplit(self.url).path.rsplit("/", 1)[-1])

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "url": self.url, "sha256": self.sha256}


@dataclass(frozen=True)
class Environment:
    """A normalized environment: specs to solve, or a lock that is already solved."""

    kind: str  # "environment.yml", "conda-lock.yml" or "explicit"
    display_name: str | None = None
    channels: tuple[str, ...] = ()  # as the file names them, in priority order; () = every configured one
    specs: tuple[str, ...] = ()  # conda MatchSpecs, normalized, sorted
    pip: tuple[str, ...] = ()  # PEP 508 requirements, normalized, sorted
    variables: tuple[tuple[str, str], ...] = ()  # sorted
    # A lock: conda subdir -> its packages (noarch ones included); None: solved from specs.
    locked: Mapping[str, tuple[LockedPackage, ...]] | None = None
    locked_pip: Mapping[str, tuple[LockedWheel, ...]] = field(default_factory=dict)

    def __hash__(self) -> int:  # the mappings are not hashable; the id says it all
        return hash(self.id)

    @property
    def frozen(self) -> bool:
        """A lock: its image never changes, whatever the tag."""
        return self.locked is not None

    def normalized(self) -> dict[str, Any]:
        """What the id covers: the meaning of the file, nothing of its spelling."""
        if self.locked is not None:
            return {
                "lock": {subdir: sorted((p.as_json() for p in packages), key=lambda p: p["url"])
                         for subdir, packages in sorted(self.locked.items())},
                "pip": {subdir: sorted((w.as_json() for w in wheels), key=lambda w: w["url"])
                        for subdir, wheels in sorted(self.locked_pip.items()) if wheels},
            }
        return {
            "name": self.display_name,
            "channels": list(self.channels),
            "dependencies": list(self.specs),
            "pip": list(self.pip),
            "variables": dict(self.variables),
        }

    @property
    def id(self) -> str:
        text = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]

    def as_json(self) -> dict[str, Any]:
        """The stored form (records/): read back with `from_json`."""
        return {"kind": self.kind, **self.normalized(), "name": self.display_name}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Environment":
        """The environment `as_json` wrote; ValueError (or KeyError/TypeError) when damaged."""
        kind = data["kind"]
        if kind not in ("environment.yml", "conda-lock.yml", "explicit"):
            raise ValueError("unknown environment kind")
        if "lock" in data:
            locked = {str(subdir): tuple(_locked_package(p["url"], p.get("sha256"), p.get("md5"), None)
                                         for p in packages) for subdir, packages in data["lock"].items()}
            wheels = {str(subdir): tuple(LockedWheel(w["name"], w["version"], w["url"], w["sha256"]) for w in items)
                      for subdir, items in data.get("pip", {}).items()}
            return cls(kind, display_name=data.get("name"), locked=locked, locked_pip=wheels)
        return cls(
            kind,
            display_name=data.get("name"),
            channels=tuple(str(c) for c in data["channels"]),
            specs=tuple(str(s) for s in data["dependencies"]),
            pip=tuple(str(p) for p in data["pip"]),
            variables=tuple(sorted((str(k), str(v)) for k, v in data["variables"].items())),
        )


# -- reading ----------------------------------------------------------------------------
def read_environment(data: bytes | str) -> Environment:
    """The environment a file describes, whatever its format. Raises EnvironmentFileError."""
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise EnvironmentFileError(f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvironmentFileError("the file is not UTF-8 text") from None
    else:
        text = data
        if len(text.encode()) > MAX_FILE_BYTES:
            raise EnvironmentFileError(f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
    text = text.removeprefix("\ufeff")
    if "\x00" in text:
        raise EnvironmentFileError("the file contains NUL bytes")
    if _is_explicit(text):
        return _read_explicit(text)
    node = _compose(text)
    if node is None:
        raise EnvironmentFileError("the file is empty")
    if not isinstance(node, yaml.MappingNode):
        raise EnvironmentFileError(
            "expected an environment.yml (name, channels, dependencies), a conda-lock file or an @EXPLICIT lock",
            _line(node))
    keys = {_scalar_text(k): (k, v) for k, v in node.value}
    if "package" in keys and "version" in keys:
        return _read_conda_lock(keys)
    return _read_environment_yml(node)


def _is_explicit(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped == "@EXPLICIT"
    return False


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases (anchors are a bomb's fuse) and with bounded nesting
    (PyYAML composes recursively: a deep file would end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise EnvironmentFileError("YAML aliases (*name) are not accepted", event.start_mark.line + 1)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise EnvironmentFileError(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _compose(text: str) -> yaml.Node | None:
    loader = _StrictLoader(text)
    try:
        return loader.get_single_node()
    except EnvironmentFileError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise EnvironmentFileError(f"not valid YAML: {exc.problem or exc.context}",
                                   mark.line + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise EnvironmentFileError(f"not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    finally:
        loader.dispose()


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _scalar_text(node: yaml.Node) -> str | None:
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _string(node: yaml.Node, what: str) -> str:
    """A scalar as text; YAML's typing of `1.0` or `yes` is undone (conda reads text)."""
    if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
        raise EnvironmentFileError(f"{what}: expected text", _line(node))
    value = node.value.strip()
    if not value:
        raise EnvironmentFileError(f"{what}: empty", _line(node))
    if any(ord(c) < 0x20 for c in value):
        raise EnvironmentFileError(f"{what}: control characters", _line(node))
    return value


def _sequence(node: yaml.Node, what: str, limit: int) -> list[yaml.Node]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise EnvironmentFileError(f"{what}: expected a list", _line(node))
    if len(node.value) > limit:
        raise EnvironmentFileError(f"{what}: more than {limit} entries", _line(node))
    return list(node.value)


def _mapping(node: yaml.Node, what: str) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return
    if not isinstance(node, yaml.MappingNode):
        raise EnvironmentFileError(f"{what}: expected a mapping", _line(node))
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = _string(key_node, f"{what} key")
        if key in seen:
            raise EnvironmentFileError(f"{what}: {key!r} is given twice", _line(key_node))
        seen.add(key)
        yield key, key_node, value_node


# -- environment.yml --------------------------------------------------------------------
def _read_environment_yml(root: yaml.MappingNode) -> Environment:
    name: str | None = None
    channels: list[str] = []
    specs: dict[str, None] = {}
    pip: dict[str, None] = {}
    variables: dict[str, str] = {}
    for key, key_node, value in _mapping(root, "the file"):
        if key not in ENV_KEYS:
            raise EnvironmentFileError(
                f"unknown key {key[:40]!r}; an environment file has {', '.join(ENV_KEYS)}", _line(key_node))
        if key == "name":
            name = _string(value, "name")[:200]
        elif key == "channels":
            for item in _sequence(value, "channels", 50):
                text = _string(item, "channels").rstrip("/")
                if text != "nodefaults" and text not in channels:
                    channels.append(text)
        elif key == "variables":
            for variable, variable_node, setting in _mapping(value, "variables"):
                variables[variable] = _variable(variable, variable_node, setting)
            if len(variables) > MAX_VARIABLES:
                raise EnvironmentFileError(f"variables: more than {MAX_VARIABLES}", _line(value))
        elif key == "dependencies":
            for item in _sequence(value, "dependencies", MAX_DEPENDENCIES):
                if isinstance(item, yaml.MappingNode):
                    for sub, sub_node, entries in _mapping(item, "dependencies"):
                        if sub != "pip":
                            raise EnvironmentFileError(
                                f"dependencies: unknown section {sub[:40]!r}; the only one is pip:", _line(sub_node))
                        for entry in _sequence(entries, "pip", MAX_PIP):
                            pip[pip_requirement(_string(entry, "pip"), _line(entry))] = None
                else:
                    specs[conda_spec(_string(item, "dependencies"), _line(item))] = None
    if not specs and not pip:
        raise EnvironmentFileError("the environment has no dependencies")
    if pip and not any(s.split()[0].split("::")[-1] == "python" for s in specs):
        raise EnvironmentFileError("pip: packages need python among the conda dependencies (python=3.11, say)")
    return Environment(
        "environment.yml",
        display_name=name,
        channels=tuple(channels),
        specs=tuple(sorted(specs)),
        pip=tuple(sorted(pip)),
        variables=tuple(sorted(variables.items())),
    )


def _variable(name: str, name_node: yaml.Node, setting: yaml.Node) -> str:
    if not _VARIABLE_RE.fullmatch(name) or len(name) > 200:
        raise EnvironmentFileError(f"variables: {name[:40]!r} is not a variable name", _line(name_node))
    if name in RESERVED_VARIABLES:
        raise EnvironmentFileError(f"variables: {name} is set by the environment's activation", _line(name_node))
    value = _string(setting, f"variables.{name}") if not (
        isinstance(setting, yaml.ScalarNode) and setting.value == "") else ""
    if len(value) > 4096:
        raise EnvironmentFileError(f"variables.{name}: longer than 4096 characters", _line(setting))
    return value


def conda_spec(text: str, line: int | None = None) -> str:
    """A conda spec as conda reads it (`numpy>=1.26`, `python=3.11`, `conda-forge::numpy`,
    `numpy=1.26=*_0`), in rattler's normal spelling (`numpy >=1.26`)."""
    if len(text) > 300:
        raise EnvironmentFileError("a spec longer than 300 characters", line)
    try:
        spec = rattler.MatchSpec(text)
    except Exception as exc:  # rattler's exception classes differ across versions
        raise EnvironmentFileError(f"{text[:80]!r} is not a conda spec: {str(exc).splitlines()[0][:200]}",
                                   line) from None
    if spec.name is None or "*" in str(spec.name):
        raise EnvironmentFileError(f"{text[:80]!r}: a spec needs a package name", line)
    return str(spec)


def pip_requirement(text: str, line: int | None = None) -> str:
    """A PEP 508 requirement for the registry's index, normalized (`Requests >= 2` ->
    `requests>=2`). Options and direct references are refused: they would send the build
    to another index, a URL or a local path."""
    if text.startswith("-"):
        option = text.split()[0].split("=")[0]
        raise EnvironmentFileError(
            f"pip: {option[:40]} is not accepted: packages come from the registry's pypi_index "
            "(a mirror is configured by the operator)", line)
    try:
        requirement = Requirement(text)
    except InvalidRequirement as exc:
        raise EnvironmentFileError(f"pip: {text[:80]!r} is not a requirement specifier ({str(exc)[:160]})",
                                   line) from None
    if requirement.url:
        raise EnvironmentFileError(f"pip: {text[:80]!r} names a URL; give a name and versions "
                                   "(packages come from the registry's pypi_index)", line)
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    marker = f"; {requirement.marker}" if requirement.marker else ""
    specifier = ",".join(sorted(str(s) for s in requirement.specifier))
    return f"{canonicalize_name(requirement.name)}{extras}{specifier}{marker}"


# -- locks ------------------------------------------------------------------------------
def _locked_package(url: str, sha256: Any, md5: Any, line: int | None) -> LockedPackage:
    if not isinstance(url, str) or not url.startswith(("https://", "http://", "file://")):
        raise EnvironmentFileError(f"{str(url)[:80]!r} is not a package URL", line)
    if any(ord(c) <= 0x20 for c in url) or len(url) > 1000:
        raise EnvironmentFileError("a package URL with spaces or control characters", line)
    parts = urlsplit(url)
    segments = parts.path.rstrip("/").split("/")
    file_name = unquote(segments[-1])
    subdir = segments[-2] if len(segments) >= 2 else ""
    if not file_name.endswith(_ARCHIVE_SUFFIXES) or not _SUBDIR_RE.fullmatch(subdir) or "/" in file_name:
        raise EnvironmentFileError(f"{file_name[:80]!r}: expected <channel>/<subdir>/<name>-<version>-<build>"
                                   ".conda (or .tar.bz2)", line)
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256_RE.fullmatch(sha256)):
        raise EnvironmentFileError(f"{file_name}: sha256 is not 64 hex digits", line)
    if md5 is not None and not (isinstance(md5, str) and _MD5_RE.fullmatch(md5)):
        raise EnvironmentFileError(f"{file_name}: md5 is not 32 hex digits", line)
    if sha256 is None and md5 is None:
        raise EnvironmentFileError(f"{file_name}: no hash (sha256 or md5)", line)
    return LockedPackage(redact_url(url), subdir, file_name, sha256, md5)


def _read_explicit(text: str) -> Environment:
    platform: str | None = None
    packages: list[LockedPackage] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line == "@EXPLICIT":
            continue
        if line.startswith("#"):
            found = re.fullmatch(r"#\s*platform:\s*(\S+)", line)
            if found:
                platform = found.group(1)
                if not _SUBDIR_RE.fullmatch(platform) or platform == "noarch":
                    raise EnvironmentFileError(f"platform {platform[:40]!r} is not a conda subdir", number)
            continue
        url, _, digest = line.partition("#")
        digest = digest.strip().removeprefix("sha256:")
        if not digest:
            raise EnvironmentFileError("a URL without its hash (#<md5> or #sha256:<hex>)", number)
        sha256, md5 = (digest, None) if len(digest) == 64 else (None, digest)
        packages.append(_locked_package(url.strip(), sha256, md5, number))
        if len(packages) > MAX_LOCKED:
            raise EnvironmentFileError(f"more than {MAX_LOCKED} packages", number)
    if not packages:
        raise EnvironmentFileError("the @EXPLICIT lock lists no packages")
    subdirs = {p.subdir for p in packages} - {"noarch"}
    if platform is None:
        if len(subdirs) > 1:
            raise EnvironmentFileError(f"packages of several platforms ({', '.join(sorted(subdirs))}) in one "
                                       "@EXPLICIT lock; one lock per platform, or a conda-lock file")
        platform = next(iter(subdirs), "noarch")  # all noarch: every platform
    elif subdirs - {platform}:
        raise EnvironmentFileError(f"packages for {', '.join(sorted(subdirs - {platform}))} in a lock for {platform}")
    _unique_names({platform: packages})
    return Environment("explicit", locked={platform: tuple(packages)})


def _read_conda_lock(keys: Mapping[str | None, tuple[yaml.Node, yaml.Node]]) -> Environment:
    version_node = keys["version"][1]
    if _scalar_text(version_node) != "1":
        raise EnvironmentFileError("conda-lock: only the unified format, version 1, is read", _line(version_node))
    for key, (key_node, _) in keys.items():
        if key not in ("version", "metadata", "package"):
            raise EnvironmentFileError(f"conda-lock: unknown key {str(key)[:40]!r}", _line(key_node))
    conda: dict[str, list[LockedPackage]] = {}
    wheels: dict[str, list[LockedWheel]] = {}
    for item in _sequence(keys["package"][1], "package", MAX_LOCKED):
        fields = {key: value for key, _, value in _mapping(item, "package")}
        where = _line(item)

        def text(name: str) -> str:
            if name not in fields:
                raise EnvironmentFileError(f"package: no {name}", where)
            return _string(fields[name], f"package.{name}")

        if "optional" in fields and _scalar_text(fields["optional"]) in ("true", "True"):
            continue  # conda-lock installs optional categories only when asked
        manager, platform, url = text("manager"), text("platform"), text("url")
        if not _SUBDIR_RE.fullmatch(platform) or platform == "noarch":
            raise EnvironmentFileError(f"package.platform: {platform[:40]!r} is not a conda subdir", where)
        hashes = {key: _string(value, f"package.hash.{key}") for key, _, value in
                  _mapping(fields.get("hash") or yaml.ScalarNode("tag:yaml.org,2002:null", ""), "package.hash")}
        if manager == "conda":
            conda.setdefault(platform, []).append(_locked_package(url, hashes.get("sha256"), hashes.get("md5"), where))
        elif manager == "pip":
            sha256 = hashes.get("sha256")
            if sha256 is None or not _SHA256_RE.fullmatch(sha256):
                raise EnvironmentFileError("package.hash: a pip package needs its sha256", where)
            if not url.startswith(("https://", "http://", "file://")) or not urlsplit(url).path.endswith(".whl"):
                raise EnvironmentFileError(f"{url[:80]!r}: pip packages are installed from wheels only "
                                           "(an sdist would run code)", where)
            wheels.setdefault(platform, []).append(
                LockedWheel(canonicalize_name(text("name")), text("version"), redact_url(url), sha256))
        else:
            raise EnvironmentFileError(f"package.manager: {manager[:40]!r}; expected conda or pip", where)
    if not conda:
        raise EnvironmentFileError("conda-lock: no conda packages")
    _unique_names(conda)
    return Environment("conda-lock.yml", locked={p: tuple(v) for p, v in conda.items()},
                       locked_pip={p: tuple(v) for p, v in wheels.items()})


def archive_name(file_name: str) -> tuple[str, str, str]:
    """(name, version, build) of `<name>-<version>-<build>.conda`."""
    stem = file_name.removesuffix(".conda").removesuffix(".tar.bz2")
    name, version, build = stem.rsplit("-", 2)
    return name, version, build


def _unique_names(locked: Mapping[str, list[LockedPackage]]) -> None:
    for platform, packages in locked.items():
        seen: dict[str, str] = {}
        for package in packages:
            try:
                name = archive_name(package.file_name)[0]
            except ValueError:
                raise EnvironmentFileError(f"{package.file_name[:80]!r}: expected <name>-<version>-<build>") from None
            if name in seen and seen[name] != package.file_name:
                raise EnvironmentFileError(f"{platform}: {name} is locked twice ({seen[name]}, {package.file_name})")
            seen[name] = package.file_name


# -- names, channels, requests -----------------------------------------------------------
def channel_aliases(configured: str) -> set[str]:
    """The ways a file may name a configured channel: as configured, its URL, its name
    (`conda-forge`; a local channel by its directory's name)."""
    plain = redact_url(configured).rstrip("/")
    source = Path(configured).as_uri() if configured.startswith("/") else configured
    found = rattler.Channel(source)
    return {plain, redact_url(found.base_url).rstrip("/"), found.name or plain}


def solve_channels(environment: Environment, configured: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the configured channels to solve with, in the file's priority order; the specs with
    each `channel::` prefix naming its configured channel). A file that names no channel
    gets every configured one. Raises EnvironmentFileError naming a channel this registry
    does not serve; a lock's packages must come from a configured channel too."""
    by_alias: dict[str, str] = {}
    for channel in configured:
        for alias in channel_aliases(channel):
            by_alias.setdefault(alias, channel)
    served = ", ".join(sorted(redact_url(c) for c in configured))

    def pick(name: str, what: str) -> str:
        found = by_alias.get(name.rstrip("/")) or by_alias.get(redact_url(name).rstrip("/"))
        if found is None:
            raise EnvironmentFileError(f"{what} {name[:80]!r} is not served by this registry (it serves {served})")
        return found

    if environment.locked is not None:
        bases = {c: redact_url(_base_url(c)) for c in configured}
        for packages in environment.locked.values():
            for package in packages:
                if not any(package.url.startswith(base) for base in bases.values()):
                    raise EnvironmentFileError(f"{package.file_name}: its URL is not in a channel this registry "
                                               f"serves ({served})")
        return tuple(configured), ()
    channels = tuple(dict.fromkeys(pick(c, "channel") for c in environment.channels)) or tuple(configured)
    specs = []
    for spec in environment.specs:
        prefix, sep, rest = spec.partition("::")
        if sep:
            channel = pick(prefix, "the channel of")
            if channel not in channels:
                raise EnvironmentFileError(f"{spec!r}: channel {prefix!r} is not among the file's channels")
            spec = f"{_base_url(channel)}::{rest}"
        specs.append(spec)
    return channels, tuple(specs)


def _base_url(configured: str) -> str:
    source = Path(configured).as_uri() if configured.startswith("/") else configured
    return rattler.Channel(source).base_url.rstrip("/") + "/"


# -- kernels -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernel:
    """An environment an image holds beside its own, at <prefix>/envs/<name>, registered as
    a Jupyter kernel (a meta-package's `kernels:`)."""

    name: str  # the directory under <prefix>/envs/ and the kernelspec's name
    environment: Environment

    @property
    def display_name(self) -> str:
        return self.environment.display_name or self.name

    @property
    def language(self) -> str | None:
        """The kernel's language as its packages say: python (ipykernel), R (IRkernel), or
        None: an environment of tools only, which gets no kernel."""
        names = {spec.split("::")[-1].split()[0] for spec in kernel_specs(self.environment)}
        if "python" in names:
            return "python"
        if names & {"r-base", "r-irkernel"}:
            return "R"
        return None


def kernel_specs(environment: Environment) -> tuple[str, ...]:
    """The specs of a kernel's environment: its own, plus `ipykernel` (or `r-irkernel`)
    where the file has the language but not the kernel (a lock is taken as it is)."""
    if environment.locked is not None:
        return tuple(sorted(f"{n} =={v} {b}" for packages in environment.locked.values()
                            for n, v, b in (archive_name(p.file_name) for p in packages)))
    names = {spec.split("::")[-1].split()[0] for spec in environment.specs}
    extra = ()
    if "python" in names and "ipykernel" not in names:
        extra = ("ipykernel",)
    elif "r-base" in names and "r-irkernel" not in names:
        extra = ("r-irkernel",)
    return tuple(sorted((*environment.specs, *extra)))
