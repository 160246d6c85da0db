"""Loading the configuration: one YAML file, every key also settable as CONDERY_<KEY>.

Precedence, lowest first: embedded defaults, the YAML file, environment variables,
command-line flags. Environment values are parsed as YAML so that
`CONDERY_CHANNELS='[conda-forge, bioconda]'` and `CONDERY_PORT=8080` both work.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping

import rattler
import yaml

from condery.common.redact import redact_text
from condery.config.schema import (
    DEFAULT_ENDPOINT_RIGHTS,
    ENDPOINTS,
    AuthConfig,
    ChannelRule,
    Config,
    ConfigError,
    CoordinationConfig,
    FailedLoginLimits,
    GcConfig,
    OidcConfig,
    PullRule,
    RobotAccount,
    StorageConfig,
)
from condery.image.meta import DEFAULT_META_PACKAGES, ImageUser, MetaPackage
from condery.image.names import OPERATORS
from condery.layers.compression import COMPRESSIONS
from condery.layers.solve import channel
from condery.oci.grammar import COMPONENT_RE
from condery.oci.platforms import oci_platform

_GC_KEYS = tuple(f.name for f in dataclasses.fields(GcConfig))
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
LOG_FORMATS = ("text", "json")
# String keys that take one of a few words.
_CHOICES = {"log_format": LOG_FORMATS, "layer_compression": COMPRESSIONS}
# Integer keys where 0 would make the registry useless (0 failed_solve_ttl, 0 queue are fine).
_AT_LEAST_ONE = frozenset(
    {"layer_budget", "max_packages", "max_concurrent_builds", "max_builds_per_client", "max_package_files",
     "max_concurrent_downloads", "header_timeout", "idle_timeout", "base_image_refresh"}  # a 0 timeout would close every connection
)
_SIZE_KEYS = frozenset({"max_package_unpacked_size", "package_cache_max_size"})
_SECONDS = frozenset({"latest_ttl", "snapshot_grace", "failed_solve_ttl", "solve_timeout", "build_timeout",
                      "header_timeout", "idle_timeout", "base_image_refresh"})
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
# Storage keys each backend reads; `backend` itself is common to both.
_STORAGE_KEYS = {"filesystem": frozenset({"path"}),
                 "s3": frozenset({"bucket", "endpoint_url", "region", "redirect"})}
_META_KEYS = frozenset(f.name for f in dataclasses.fields(MetaPackage))
_COORDINATION_KEYS = {"local": frozenset(), "redis": frozenset({"url", "lease"})}
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class _Problems:
    """Every problem of one configuration, one line each, raised together at the end:
    an operator fixes the file once, not once per key."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: str, message: str) -> None:
        # A channel URL (quoted by us or by rattler) may carry a token: never print it.
        self.lines.append(redact_text(f"{path}: {message}"))

    def raise_any(self) -> None:
        if self.lines:
            raise ConfigError("\n".join(self.lines))


def _shown(value: Any) -> str:
    """A value quoted for an error line: repr, one line, kept short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _unknown(key: Any, known: Any) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    return f"unknown key{f' (did you mean {close[0]}?)' if close else ''}; known: {', '.join(sorted(known))}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _boolean(path: str, value: Any, problems: _Problems) -> bool | None:
    # Only YAML's own booleans: `redirect: "no"` or `ture` would otherwise silently be
    # whatever a loose parser guesses. CONDERY_X=true is YAML-parsed, hence a real bool.
    if isinstance(value, bool):
        return value
    problems.add(path, f"expected true or false, got {_shown(value)}")
    return None


def _integer(path: str, value: Any, problems: _Problems, minimum: int = 0, maximum: int | None = None,
             unit: str = "") -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):  # True is an int to Python, not to us
        problems.add(path, f"expected an integer, got {_shown(value)}")
        return None
    if value < minimum or (maximum is not None and value > maximum):
        unit = f" {unit}{'s' if minimum != 1 else ''}" if unit else ""
        bounds = f"at least {minimum}{unit}" + (f" and at most {maximum}" if maximum is not None else "")
        problems.add(path, f"{value} is out of range ({bounds})")
        return None
    return value


def _string(path: str, value: Any, problems: _Problems, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        problems.add(path, f"expected a non-empty string, got {_shown(value)}")
        return None
    return value


def _string_list(path: str, value: Any, problems: _Problems) -> tuple[str, ...] | None:
    """A non-empty list of strings; a comma-separated string is a list too (environment)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        problems.add(path, f"expected a non-empty list, got {_shown(value)}")
        return None
    items = [_string(f"{path}[{i}]", v, problems) for i, v in enumerate(value)]
    if any(item is None for item in items):
        return None
    duplicates = sorted({v for v in items if items.count(v) > 1})  # type: ignore[misc]
    if duplicates:
        problems.add(path, f"listed twice: {', '.join(duplicates)}")  # type: ignore[arg-type]
        return None
    return tuple(items)  # type: ignore[arg-type]


def _size(path: str, value: Any, problems: _Problems) -> int | None:
    """Bytes from an integer or a size such as "8GiB", "500MB", "2G"."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", value if isinstance(value, str) else "", re.IGNORECASE)
        if match is None:
            problems.add(path, f"expected a size such as 8GiB or 500MB, got {_shown(value)}")
            return None
        number = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    if number < 1:
        problems.add(path, f"{number} is out of range (at least 1 byte)")
        return None
    return number


@functools.cache
def _known_subdirs() -> frozenset[str]:
    # rattler knows every conda subdir (osx-64, win-64, emscripten-wasm32, ...).
    return frozenset(str(p) for p in rattler.Subdir.all())


def _platforms(path: str, value: Any, problems: _Problems) -> tuple[str, ...] | None:
    subdirs = _string_list(path, value, problems)
    if subdirs is None:
        return None
    ok = True
    for i, subdir in enumerate(subdirs):
        if subdir not in _known_subdirs():
            close = difflib.get_close_matches(subdir, sorted(_known_subdirs()), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.add(f"{path}[{i}]", f"{_shown(subdir)} is not a conda subdir{hint}")
            ok = False
            continue
        try:
            oci_platform(subdir)  # a conda subdir with no Linux container platform (osx-64)
        except ValueError as exc:
            problems.add(f"{path}[{i}]", str(exc))
            ok = False
    return subdirs if ok else None


def _backend_values(path: str, value: Any, problems: _Problems, keys: Mapping[str, frozenset[str]],
                    default: str, convert: Callable[[str, str, Any], Any]) -> dict[str, Any] | None:
    """A section chosen by its `backend` key (storage, coordination): `backend` and each of
    its keys' values through `convert(backend, key, item)`, in the file's order, every key
    of another backend or of none reported. A null is an unset key."""
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping, got {_shown(value)}")
        return None
    backend = value.get("backend", default)
    if backend not in keys:
        problems.add(f"{path}.backend", f"expected {' or '.join(keys)}, got {_shown(backend)}")
        return None
    known = frozenset().union(*keys.values())
    values: dict[str, Any] = {"backend": backend}
    for key, item in value.items():
        if key == "backend" or (item is None and key in known):
            continue
        if key not in known:
            problems.add(_join(path, key), _unknown(key, {"backend", *keys[backend]}))
        elif key not in keys[backend]:
            # e.g. a bucket left over under the filesystem backend: the operator meant s3?
            shown = ", ".join(["backend", *sorted(keys[backend])])
            problems.add(_join(path, key), f"not a key of the {backend} backend (its keys: {shown})")
        else:
            values[key] = convert(backend, key, item)
    return values


def _storage(path: str, value: Any, problems: _Problems) -> StorageConfig | None:
    if isinstance(value, StorageConfig):  # a caller's ready-made one (tests, tools)
        return value
    before = len(problems.lines)

    def convert(backend: str, key: str, item: Any) -> Any:
        if key == "redirect":
            return _boolean(_join(path, key), item, problems)
        return _string(_join(path, key), item, problems, optional=key != "path")

    values = _backend_values(path, value, problems, _STORAGE_KEYS, StorageConfig.backend, convert)
    if values is None:
        return None
    if values["backend"] == "s3" and not values.get("bucket") and len(problems.lines) == before:
        problems.add(f"{path}.bucket", "required for the s3 backend")
    return StorageConfig(**values) if len(problems.lines) == before else None


def _coordination(path: str, value: Any, problems: _Problems) -> CoordinationConfig | None:
    if isinstance(value, CoordinationConfig):  # a caller's ready-made one (tests, tools)
        return value
    before = len(problems.lines)

    def convert(backend: str, key: str, item: Any) -> Any:
        if key == "lease":
            return _integer(_join(path, key), item, problems, 1, None, "second")
        url = _string(_join(path, key), item, problems)
        if url is not None and not url.startswith(_REDIS_SCHEMES):
            problems.add(_join(path, key), f"expected a redis://HOST:PORT/DB URL, got {_shown(redact_text(url))}")
        return url

    values = _backend_values(path, value, problems, _COORDINATION_KEYS, CoordinationConfig.backend, convert)
    if values is None:
        return None
    if values["backend"] == "redis" and not values.get("url") and len(problems.lines) == before:
        problems.add(f"{path}.url", "required for the redis backend (redis://HOST:PORT/DB)")
    return CoordinationConfig(**values) if len(problems.lines) == before else None


def _gc(path: str, value: Any, problems: _Problems) -> GcConfig | None:
    if isinstance(value, GcConfig):  # a caller's ready-made one (tests, tools)
        return value
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping, got {_shown(value)}")
        return None
    before = len(problems.lines)
    values: dict[str, Any] = {}
    for key, item in value.items():
        if key not in _GC_KEYS:
            problems.add(_join(path, key), _unknown(key, _GC_KEYS))
        elif item is None and key == "snapshots_max_age":
            values[key] = None  # null: date tags live forever
        else:
            values[key] = _integer(_join(path, key), item, problems, 0, None, "second")
    return GcConfig(**values) if len(problems.lines) == before else None


def _meta_name(path: str, name: Any, problems: _Problems) -> bool:
    """A meta-package name is one name component that no spec component can also mean."""
    if not isinstance(name, str) or not COMPONENT_RE.fullmatch(name):
        problems.add(path, f"name {_shown(name)} is not a name component "
                           "(lowercase [a-z0-9] separated by '.', '_', '__' or '-')")
        return False
    shadowing = [t for t in name.split(".")[1:] if t in OPERATORS]
    if shadowing:
        problems.add(path, f"name {_shown(name)} has the operator word {shadowing[0]!r} after a dot: "
                           "it would read as a versioned spec")
        return False
    return True


def _specs(path: str, value: Any, problems: _Problems) -> tuple[str, ...] | None:
    specs = _string_list(path, value, problems)
    if specs is None:
        return None
    ok = True
    for i, spec in enumerate(specs):
        try:
            rattler.MatchSpec(spec)
        except Exception as exc:  # rattler's exception classes differ across versions
            problems.add(f"{path}[{i}]", f"{_shown(spec)} is not a conda match spec ({str(exc).splitlines()[0]})")
            ok = False
    return specs if ok else None


def _cmd(path: str, value: Any, problems: _Problems) -> tuple[str, ...] | None:
    """A list of arguments, or one string split as a POSIX shell would (no shell runs it)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:  # an unclosed quote
            problems.add(path, f"cannot split {_shown(value)} into arguments: {exc}")
            return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        problems.add(path, f"expected a list of strings or a command line, got {_shown(value)}")
        return None
    return tuple(value)


# POSIX's portable user and group names (useradd's default check), at most 32 characters.
_ACCOUNT_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# An absolute path that needs no quoting in /etc/passwd (no ':') or a shell, as the prefix.
_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9._+-]+)+")
# A home or working directory is written into the environment layer owned by the user:
# never one of the system's own directories, whose owner and mode every program relies on.
_SYSTEM_DIRS = frozenset({"/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt",
                          "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var"})
_UNDER_SYSTEM = ("/etc/", "/proc/", "/sys/", "/dev/", "/usr/", "/bin/", "/sbin/", "/lib/", "/lib64/", "/run/")
_USER_KEYS = frozenset(f.name for f in dataclasses.fields(ImageUser))
_MAX_ID = 2**31 - 1


def _plain_path(path: str, value: Any, problems: _Problems, *, owned: bool = False) -> str | None:
    text = _string(path, value, problems, optional=True)
    if text is None:
        return None
    if not _PLAIN_PATH.fullmatch(text) or any(part in (".", "..") for part in text.split("/")):
        problems.add(path, f"expected an absolute path of [A-Za-z0-9._+-] parts, got {_shown(text)}")
        return None
    if owned and (text in _SYSTEM_DIRS or text.startswith(_UNDER_SYSTEM)):
        problems.add(path, f"{_shown(text)} is a system directory; the user's own directory goes elsewhere "
                           "(e.g. /home/NAME)")
        return None
    return text


def _image_user(path: str, value: Any, problems: _Problems) -> ImageUser | None:
    """`{name: jovyan, uid: 1000, gid: 100, group: users, home: /home/jovyan, shell: ...}`;
    only name and uid are required (gid defaults to uid, group to name, home to /home/NAME)."""
    if value is None or isinstance(value, ImageUser):
        return value
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping such as {{name: jovyan, uid: 1000}}, got {_shown(value)}")
        return None
    before = len(problems.lines)
    for key in value:
        if key not in _USER_KEYS:
            problems.add(_join(path, key), _unknown(key, _USER_KEYS))
    for key in ("name", "uid"):
        if key not in value:
            problems.add(_join(path, key), "required")
    name, group = value.get("name"), value.get("group", value.get("name"))
    for key, text in (("name", name), ("group", group)):
        if key in value and not (isinstance(text, str) and _ACCOUNT_NAME.fullmatch(text)):
            problems.add(_join(path, key), f"expected a name of [a-z0-9_-] starting with a letter or _ "
                                           f"(at most 32), got {_shown(text)}")
    # uid 0 would replace root's line in /etc/passwd; an image that runs as root needs no user.
    uid = _integer(_join(path, "uid"), value.get("uid", 1), problems, 1, _MAX_ID)
    gid = _integer(_join(path, "gid"), value.get("gid", uid if uid is not None else 1), problems, 0, _MAX_ID)
    if gid == 0 and group != "root":
        problems.add(_join(path, "group"), f"gid 0 is the group root, got {_shown(group)}")
    if "home" not in value and len(problems.lines) != before:
        return None  # no default home from a bad name: one problem, one line
    home = _plain_path(_join(path, "home"), value.get("home", f"/home/{name}"), problems, owned=True)
    shell = _plain_path(_join(path, "shell"), value.get("shell"), problems)
    if len(problems.lines) != before or uid is None or gid is None or home is None:
        return None
    return ImageUser(name=name, uid=uid, gid=gid, group=group, home=home, shell=shell)


def _string_map(path: str, value: Any, problems: _Problems, key_re: str, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping of {what} to value, got {_shown(value)}")
        return {}
    for key, setting in value.items():
        if not isinstance(key, str) or not re.fullmatch(key_re, key):
            problems.add(path, f"{_shown(key)} is not {'an' if what[0] in 'aeiou' else 'a'} {what}")
        elif isinstance(setting, bool) or not isinstance(setting, (str, int, float)):
            # `DEBUG: yes` is a YAML bool; the image would get "True". Quote it.
            problems.add(_join(path, key), f"expected a string (quote it), got {_shown(setting)}")
    return {str(k): str(v) for k, v in value.items()}


def _meta_package(path: str, value: Any, problems: _Problems) -> MetaPackage | None:
    if isinstance(value, MetaPackage):
        return value
    if isinstance(value, (list, tuple)):  # `name: [spec, ...]` is short for `name: {specs: [...]}`
        value = {"specs": value}
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a list of specs or a mapping with 'specs', got {_shown(value)}")
        return None
    before = len(problems.lines)
    for key in value:
        if key not in _META_KEYS:
            problems.add(_join(path, key), _unknown(key, _META_KEYS))
    if "specs" not in value:
        problems.add(f"{path}.specs", "required (a non-empty list of conda specs)")
    specs = _specs(f"{path}.specs", value["specs"], problems) if "specs" in value else None
    user = _image_user(f"{path}.user", value.get("user"), problems)
    workdir = _plain_path(f"{path}.workdir", value.get("workdir"), problems, owned=True)
    env = _string_map(f"{path}.env", value.get("env"), problems, r"[A-Za-z_][A-Za-z0-9_]*",
                      "environment variable name")
    # OCI's label keys are reverse-DNS by convention; any printable key without '=' works in engines.
    labels = _string_map(f"{path}.labels", value.get("labels"), problems, r"[A-Za-z0-9][A-Za-z0-9._/-]*", "label key")
    cmd = _cmd(f"{path}.cmd", value.get("cmd"), problems)
    entrypoint = _cmd(f"{path}.entrypoint", value.get("entrypoint"), problems)
    kernels = _kernels(f"{path}.kernels", value.get("kernels"), problems)
    changeable = _boolean(f"{path}.changeable", value["changeable"], problems) if "changeable" in value else None
    if len(problems.lines) != before or specs is None:
        return None
    return MetaPackage(specs=specs, user=user, env=env, workdir=workdir, cmd=cmd, entrypoint=entrypoint,
                       labels=labels, kernels=kernels, changeable=changeable)


def _kernels(path: str, value: Any, problems: _Problems) -> tuple[str, ...]:
    """`all`, or names of the environments folder (`team-a`) and pushed ids (`env/<id>`)."""
    if value is None or value == []:
        return ()
    if value == "all":
        return ("all",)
    names = _string_list(path, value, problems)
    for i, name in enumerate(names or ()):
        kernel = name.removeprefix("env/")
        if name != "all" and not (COMPONENT_RE.fullmatch(kernel) and len(kernel) <= 64):
            problems.add(f"{path}[{i}]", f"{_shown(name)} is not an environment name (team-a, env/<id> or all)")
    return tuple(names or ())


def _meta_packages(path: str, value: Any, problems: _Problems) -> dict[str, MetaPackage] | None:
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping of name to settings, got {_shown(value)}")
        return None
    metas = dict(DEFAULT_META_PACKAGES)  # configured ones add to (or replace) the defaults
    for name, settings in value.items():
        if _meta_name(_join(path, name), name, problems):
            package = _meta_package(_join(path, name), settings, problems)
            if package is not None:
                metas[name] = package
    return metas


def _channels(path: str, value: Any, problems: _Problems) -> tuple[str, ...] | None:
    names = _string_list(path, value, problems)
    if names is None:
        return None
    ok = True
    for i, name in enumerate(names):
        try:
            channel(name)  # as the solver will read it: `http://` or `::` would fail every solve
        except Exception as exc:  # rattler's exception classes differ across versions
            problems.add(f"{path}[{i}]", f"{_shown(name)} is not a channel ({str(exc).splitlines()[0]})")
            ok = False
    return names if ok else None


# -- auth: ----------------------------------------------------------------------------
_FIELDS_AUTH = {f.name: f for f in dataclasses.fields(AuthConfig)}
_AUTH_KEYS = tuple(_FIELDS_AUTH)
_OIDC_KEYS = tuple(f.name for f in dataclasses.fields(OidcConfig))
_LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(FailedLoginLimits))
_ROBOT_KEYS = ("token_sha256", "groups")
# anonymous, authenticated, user:NAME, group:NAME (NAME may hold ':' — an OIDC prefix).
_PRINCIPAL = re.compile(r"anonymous|authenticated|(user|group):\S+")
# A glob on canonical names: `*` within a component, `**` across components, `?` one character.
_NAME_GLOB = re.compile(r"[a-z0-9._*?-]+(/[a-z0-9._*?-]+)*")
_ROBOT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_HTTP_URL = re.compile(r"https?://[^\s/]+\S*")


def _mapping(path: str, value: Any, problems: _Problems, keys: tuple[str, ...]) -> Mapping[str, Any] | None:
    """`value` if it is a mapping whose keys are all among `keys` (else its problems)."""
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping, got {_shown(value)}")
        return None
    ok = True
    for key in value:
        if key not in keys:
            problems.add(_join(path, key), _unknown(key, keys))
            ok = False
    return value if ok else None


def _principals(path: str, value: Any, problems: _Problems) -> tuple[str, ...] | None:
    """A list of principals; an empty list is nobody."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        problems.add(path, f"expected a list such as [anonymous], [authenticated] or [group:NAME, user:NAME], "
                           f"got {_shown(value)}")
        return None
    ok = True
    for i, item in enumerate(value):
        if not isinstance(item, str) or not _PRINCIPAL.fullmatch(item):
            problems.add(f"{path}[{i}]", f"expected anonymous, authenticated, user:NAME or group:NAME, "
                                         f"got {_shown(item)}")
            ok = False
    return tuple(value) if ok else None


def _readable_file(path: str, value: Any, problems: _Problems, what: str) -> str | None:
    text = _string(path, value, problems, optional=True)
    if text is None:
        return None
    if not Path(text).is_file():
        problems.add(path, f"{_shown(text)} is not a file ({what})")
        return None
    if not os.access(text, os.R_OK):
        problems.add(path, f"{_shown(text)} cannot be read by this process ({what})")
        return None
    return text


def _url(path: str, value: Any, problems: _Problems, what: str, optional: bool = False) -> str | None:
    text = _string(path, value, problems, optional=optional)
    if text is not None and not _HTTP_URL.fullmatch(text):
        problems.add(path, f"expected an http(s):// URL ({what}), got {_shown(redact_text(text))}")
        return None
    return text


def _pull_rules(path: str, value: Any, problems: _Problems) -> tuple[PullRule, ...] | None:
    if not isinstance(value, (list, tuple)) or not value:
        problems.add(path, f"expected a non-empty list of {{names: [GLOB, ...], pull: [PRINCIPAL, ...]}}, "
                           f"got {_shown(value)}")
        return None
    rules = []
    before = len(problems.lines)
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        rule = _mapping(where, item, problems, ("names", "pull"))
        if rule is None:
            continue
        for key in ("names", "pull"):
            if key not in rule:
                problems.add(f"{where}.{key}", "required")
        names = rule.get("names")
        if isinstance(names, str):
            names = [names]
        if names is not None:
            if not isinstance(names, (list, tuple)) or not names:
                problems.add(f"{where}.names", f"expected a non-empty list of name globs, got {_shown(names)}")
                names = None
            else:
                for j, glob in enumerate(names):
                    if not isinstance(glob, str) or not _NAME_GLOB.fullmatch(glob):
                        problems.add(f"{where}.names[{j}]", f"expected a glob on canonical names "
                                     f"(lowercase components, * within one, ** across), got {_shown(glob)}")
                        names = None
                        break
        pull = _principals(f"{where}.pull", rule["pull"], problems) if "pull" in rule else None
        if names is not None and pull is not None:
            rules.append(PullRule(tuple(names), pull))
    return tuple(rules) if len(problems.lines) == before else None


def _endpoint_rights(path: str, value: Any, problems: _Problems) -> dict[str, tuple[str, ...]] | None:
    section = _mapping(path, value, problems, ENDPOINTS)
    if section is None:
        return None
    rights = dict(DEFAULT_ENDPOINT_RIGHTS)
    before = len(problems.lines)
    for key, item in section.items():
        principals = _principals(_join(path, key), item, problems)
        if principals is not None:
            rights[key] = principals
    return rights if len(problems.lines) == before else None


def _channel_rules(path: str, value: Any, problems: _Problems) -> tuple[ChannelRule, ...] | None:
    if not isinstance(value, (list, tuple)):
        problems.add(path, f"expected a list of {{channel: CHANNEL, read: [PRINCIPAL, ...]}}, got {_shown(value)}")
        return None
    rules = []
    before = len(problems.lines)
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        rule = _mapping(where, item, problems, ("channel", "read"))
        if rule is None:
            continue
        channel_name = _string(f"{where}.channel", rule.get("channel"), problems)
        if "read" not in rule:
            problems.add(f"{where}.read", "required")
            continue
        read = _principals(f"{where}.read", rule["read"], problems)
        if channel_name is not None and read is not None:
            rules.append(ChannelRule(channel_name, read))
    return tuple(rules) if len(problems.lines) == before else None


def _robots(path: str, value: Any, problems: _Problems) -> dict[str, RobotAccount] | None:
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a mapping of robot name to {{token_sha256, groups}}, got {_shown(value)}")
        return None
    robots = {}
    before = len(problems.lines)
    for name, item in value.items():
        where = _join(path, name)
        if not isinstance(name, str) or not _ROBOT_NAME.fullmatch(name):
            problems.add(where, f"a robot's name is lowercase [a-z0-9._-] (at most 64), got {_shown(name)}")
            continue
        robot = _mapping(where, item, problems, _ROBOT_KEYS)
        if robot is None:
            continue
        digest = robot.get("token_sha256")
        if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
            # Never echo the value: an operator may have pasted the token itself here.
            problems.add(f"{where}.token_sha256", "expected the 64 lowercase hex digits of the token's sha256 "
                                                  "(printf %s TOKEN | sha256sum), not the token")
            continue
        groups = robot.get("groups", [])
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, str) and g.strip() for g in groups):
            problems.add(f"{where}.groups", f"expected a list of group names, got {_shown(groups)}")
            continue
        robots[name] = RobotAccount(digest, tuple(groups))
    return robots if len(problems.lines) == before else None


def _oidc(path: str, value: Any, problems: _Problems) -> OidcConfig | None:
    if value is None or isinstance(value, OidcConfig):
        return value
    section = _mapping(path, value, problems, _OIDC_KEYS)
    if section is None:
        return None
    before = len(problems.lines)
    for key in ("issuer", "jwks_url", "audience"):
        if key not in section:
            problems.add(_join(path, key), "required")
    values: dict[str, Any] = {}
    for key, item in section.items():
        where = _join(path, key)
        if key == "issuer":
            values[key] = _url(where, item, problems, "the issuer's `iss`")
        elif key == "jwks_url":
            values[key] = _url(where, item, problems, "the issuer's JSON Web Key Set")
        elif key == "jwks_cache":
            values[key] = _integer(where, item, problems, 1, None, "second")
        elif key == "algorithms":
            algorithms = _string_list(where, item, problems)
            allowed = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")
            bad = [a for a in algorithms or () if a not in allowed]
            if bad:
                problems.add(where, f"{_shown(bad[0])} is not an asymmetric JWS algorithm ({', '.join(allowed)})")
            values[key] = algorithms
        elif key in ("username_prefix", "groups_prefix"):
            if not isinstance(item, str):
                problems.add(where, f"expected a string (may be empty), got {_shown(item)}")
            values[key] = item
        else:
            values[key] = _string(where, item, problems)
    return OidcConfig(**values) if len(problems.lines) == before else None


def _failed_logins(path: str, value: Any, problems: _Problems) -> FailedLoginLimits | None:
    section = _mapping(path, value, problems, _LIMIT_KEYS)
    if section is None:
        return None
    before = len(problems.lines)
    values = {key: _integer(_join(path, key), item, problems, 1, None, "second" if key == "window" else "")
              for key, item in section.items()}
    return FailedLoginLimits(**values) if len(problems.lines) == before else None


def _auth(path: str, value: Any, problems: _Problems) -> AuthConfig | None:
    if value is None or isinstance(value, AuthConfig):
        return value
    if isinstance(value, str):  # CONDERY_AUTH holds the section as YAML text
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            problems.add(path, "expected a mapping (YAML), got text that does not parse")
            return None
    section = _mapping(path, value, problems, _AUTH_KEYS)
    if section is None:
        return None
    before = len(problems.lines)
    values: dict[str, Any] = {}
    for key, item in section.items():
        where = _join(path, key)
        if item is None and _FIELDS_AUTH[key].default is None:
            values[key] = None
        elif key in ("service", "issuer"):
            values[key] = _string(where, item, problems)
        elif key == "realm":
            values[key] = _url(where, item, problems, "the token endpoint, such as https://HOST/token")
        elif key == "signing_key_file":
            values[key] = _readable_file(where, item, problems, "a PEM private key, RSA or EC")
        elif key == "signing_secret":
            secret = _string(where, item, problems)
            if secret is not None and len(secret) < 32:
                problems.add(where, f"an HS256 secret of at least 32 characters, got {len(secret)} "
                                    "(openssl rand -hex 32)")
            values[key] = secret
        elif key in ("token_ttl", "refresh_token_ttl"):
            values[key] = _integer(where, item, problems, 1, None, "second")
        elif key == "leeway":
            values[key] = _integer(where, item, problems, 0, 600, "second")
        elif key == "users_file":
            values[key] = _readable_file(where, item, problems, "an htpasswd file of bcrypt hashes: htpasswd -B")
        elif key == "groups_file":
            values[key] = _readable_file(where, item, problems, "YAML: {group: [user, ...]}")
        elif key == "robots":
            values[key] = _robots(where, item, problems)
        elif key == "oidc":
            values[key] = _oidc(where, item, problems)
        elif key == "rules":
            values[key] = _pull_rules(where, item, problems)
        elif key == "endpoints":
            values[key] = _endpoint_rights(where, item, problems)
        elif key == "channels":
            values[key] = _channel_rules(where, item, problems)
        elif key == "failed_logins":
            values[key] = _failed_logins(where, item, problems)
    if len(problems.lines) != before:
        return None
    if not values.get("signing_key_file") and not values.get("signing_secret"):
        problems.add(f"{path}.signing_key_file", "required: a PEM private key (RSA or EC P-256) to sign tokens with, "
                                                 "or auth.signing_secret (HS256, at least 32 characters)")
        return None
    if values.get("signing_key_file") and values.get("signing_secret"):
        problems.add(f"{path}.signing_secret", "give either signing_key_file or signing_secret, not both")
        return None
    return AuthConfig(**values)


def _check_channel_rules(auth: AuthConfig | None, channels: tuple[str, ...] | None, problems: _Problems) -> None:
    """A channel rule names one of the configured channels, as written there."""
    if auth is None or channels is None:
        return
    for i, rule in enumerate(auth.channels):
        if rule.channel not in channels:
            problems.add(f"auth.channels[{i}].channel", f"{_shown(redact_text(rule.channel))} is not one of the "
                                                        f"configured channels")


def _coerce(key: str, value: Any, problems: _Problems) -> Any:
    """The typed value of top-level `key`, or None after adding its problems."""
    if key == "channels":
        return _channels(key, value, problems)
    if key == "platforms":
        return _platforms(key, value, problems)
    if key == "storage":
        return _storage(key, value, problems)
    if key == "coordination":
        return _coordination(key, value, problems)
    if key == "gc":
        return _gc(key, value, problems)
    if key == "meta_packages":
        return _meta_packages(key, value, problems)
    if key == "auth":
        return _auth(key, value, problems)
    if key in _SIZE_KEYS:
        return _size(key, value, problems)
    default = _FIELDS[key].default
    if isinstance(default, bool):
        return _boolean(key, value, problems)
    if isinstance(default, int):
        maximum = 65535 if key == "port" else None
        unit = "second" if key in _SECONDS else ""
        return _integer(key, value, problems, 1 if key in _AT_LEAST_ONE else 0, maximum, unit)
    value = _string(key, value, problems, optional=default is None)
    if key == "prefix" and value is not None:
        # The prefix is pasted into activation scripts and binary placeholders: keep it plain.
        if not re.fullmatch(r"(/[A-Za-z0-9._+-]+)+", value) or "/../" in value + "/":
            problems.add(key, f"expected an absolute path of [A-Za-z0-9._+-] parts, got {_shown(value)}")
    if key == "base_image_auth_file" and value is not None and not Path(value).is_file():
        problems.add(key, f"{_shown(value)} is not a file (a Docker config.json with an `auths` section)")
        return None
    if key == "environments_dir" and value is not None and not Path(value).is_dir():
        problems.add(key, f"{_shown(value)} is not a directory (of environment files)")
        return None
    if key == "pypi_index" and value is not None and not re.fullmatch(r"(https?|file)://\S+", value):
        problems.add(key, f"expected an http(s):// or file:// URL of a simple index, got {_shown(value)}")
        return None
    if key in _CHOICES and value is not None and value not in _CHOICES[key]:
        problems.add(key, f"expected {' or '.join(_CHOICES[key])}, got {_shown(value)}")
        return None
    return value


def _read_file(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
    return loaded


def _check_owned_dirs(metas: Mapping[str, MetaPackage] | None, prefix: str, problems: _Problems) -> None:
    """A user's home or working directory must not overlap the prefix: the environment
    layer writes them owned by the user, and the prefix belongs to root."""
    for name, package in (metas or {}).items():
        owned = {"workdir": package.workdir, "user.home": package.user.home if package.user else None}
        for key, directory in owned.items():
            if directory and (f"{directory}/".startswith(f"{prefix}/") or f"{prefix}/".startswith(f"{directory}/")):
                problems.add(f"meta_packages.{name}.{key}", f"{_shown(directory)} overlaps the prefix {prefix}")


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Build the effective configuration from defaults, `path`, `environ` and overrides.

    Raises ConfigError naming every problem, one line each, as `key.path: what is wrong`.
    """
    values: dict[str, Any] = dict(_read_file(path)) if path is not None else {}
    origin: dict[str, str] = {}
    environ = os.environ if environ is None else environ
    for key, spec in _FIELDS.items():
        raw = environ.get(f"CONDERY_{key.upper()}")
        if raw is None:
            continue
        origin[key] = f"CONDERY_{key.upper()}"
        if isinstance(spec.default, str) or spec.default is None:
            values[key] = raw  # a string key takes the text as it is (a tag "1.0" stays text)
            continue
        try:
            values[key] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            values[key] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    problems = _Problems()
    for key in values:
        if key not in _FIELDS:
            problems.add(str(key), _unknown(key, _FIELDS))
    typed = {k: _coerce(k, v, problems) for k, v in values.items() if k in _FIELDS}
    _check_owned_dirs(typed.get("meta_packages"), typed.get("prefix") or Config.prefix, problems)
    _check_channel_rules(typed.get("auth"), typed.get("channels", Config.channels), problems)
    for i, line in enumerate(problems.lines):  # name the variable when the value came from one
        key = re.split(r"[.:\[]", line, maxsplit=1)[0]
        if key in origin:
            problems.lines[i] = f"{line} (from {origin[key]})"
    problems.raise_any()
    return Config(**typed)


