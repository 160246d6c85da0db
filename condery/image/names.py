"""Image names: a path of components, each one conda spec or one meta-package.

    numpy                -> numpy
    scipy.gt.1.0         -> scipy >1.0
    python.eq.3.11       -> python 3.11.*      (fuzzy, as `python=3.11` for conda)
    numpy.ge.1.20.lt.2   -> numpy >=1.20,<2    (constraints chain with AND)
    shell                -> the meta-package's specs, from configuration

A component is split on dots. The first token always belongs to the package name, so
packages called `eq`, `ge`, ... are expressible (`ge`, `ge.gt.1`). Every later token
that is an operator word starts a constraint whose version runs to the next operator
word or the end. Hence a package whose dotted name has an operator word after its first
dot (`foo.lt`) cannot be named, and neither can a version containing an operator word
as a dot-separated part; `spec_to_component` refuses both rather than produce a name
that parses back differently.

Canonical form: constraints sorted and de-duplicated inside a component, components
sorted and de-duplicated in the name. `scipy/numpy` and `numpy/scipy` are one image.

People type conda's own syntax into names (`numpy>=1.26`, `numpy=1.26`, `numpy 1.26`,
`conda-forge::numpy`): `spec_component` turns a conda spec into its component, and a
NAME_INVALID for such a component says how to write it (`numpy.ge.1.26`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import rattler

from condery.image.environment import ID_LENGTH, Environment, Kernel, archive_name, kernel_specs
from condery.image.meta import MetaConflict, MetaPackage, combine_meta_packages
from condery.oci.errors import NameInvalid
from condery.oci.grammar import COMPONENT_RE

MAX_NAME_LENGTH = 255

OPERATORS: dict[str, str] = {"eq": "", "ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}

GRAMMAR_HINT = (
    "expected components like numpy, scipy.gt.1.0, numpy.ge.1.20.lt.2, python.eq.3.11 "
    "joined by '/'; operators eq ne gt ge lt le; each component lowercase [a-z0-9] "
    "separated by '.', '_', '__' or '-'"
)


@dataclass(frozen=True)
class ImageRequest:
    canonical_name: str  # sorted, de-duplicated canonical components joined by "/"
    components: tuple[str, ...]  # the canonical components
    specs: tuple[str, ...]  # conda spec strings, canonical, sorted, de-duplicated
    meta: tuple[str, ...]  # meta-package names used, sorted
    # `env/<id>` and `envs/<name>`: the environment file the name stands for (its specs
    # above); None for a name that is a list of specs.
    environment: Environment | None = None
    # The environments a meta-package's `kernels:` adds at <prefix>/envs/<name> (resolved by
    # the builder: they live in the store or the environments folder).
    kernels: tuple[Kernel, ...] = ()
    # The configured channels this request may draw from (auth's channel rules: those its
    # caller may read), in configuration order; None: every configured channel.
    channels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ImageRef:
    """Where the manifests of one resolved image are, in both media-type families."""

    oci_digest: str
    oci_media_type: str  # OCI manifest, or OCI index when several platforms
    docker_digest: str
    docker_media_type: str  # Docker schema2 manifest or manifest list


@dataclass(frozen=True)
class _Component:
    canonical: str
    spec: str


def _invalid(name: str, reason: str) -> NameInvalid:
    return NameInvalid(f"invalid image name {_quoted(name)}: {reason}; {GRAMMAR_HINT}")


def _quoted(text: str, limit: int = 80) -> str:
    """repr() cut to `limit` characters: any input gives a message of bounded size."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _constraint_text(op: str, version: str) -> str:
    # `eq` is fuzzy, like `python=3.11` on conda's command line.
    return f"{version}.*" if op == "eq" else f"{OPERATORS[op]}{version}"


def _build_spec(name: str, constraints: Sequence[tuple[str, str]]) -> str:
    spec = name
    if constraints:
        spec += " " + ",".join(_constraint_text(op, v) for op, v in constraints)
    try:
        # Validates the package name and every version against conda's grammar.
        rattler.MatchSpec(spec)
    except Exception as exc:  # rattler's exception classes differ across versions
        raise ValueError(f"{spec!r} is not a valid conda spec: {exc}") from None
    return spec


@functools.lru_cache(maxsize=4096)
def _parse_component(component: str) -> _Component:
    """Parse one non-meta component; raises ValueError with a short reason.

    Cached because warm manifest GETs parse the same names over and over, and the
    result is a pure function of the string.
    """
    if not COMPONENT_RE.fullmatch(component):
        raise ValueError(f"component {component!r} does not match the OCI name grammar")
    tokens = component.split(".")
    first_op = next((i for i in range(1, len(tokens)) if tokens[i] in OPERATORS), len(tokens))
    name = ".".join(tokens[:first_op])
    unknown = _unknown_operator(tokens[:first_op])
    if unknown:
        raise ValueError(f"unknown operator {unknown!r} in {component!r}; operators are {' '.join(OPERATORS)}")
    constraints: list[tuple[str, str]] = []
    i = first_op
    while i < len(tokens):
        op = tokens[i]
        j = i + 1
        while j < len(tokens) and tokens[j] not in OPERATORS:
            j += 1
        if j == i + 1:
            raise ValueError(f"operator {op!r} in {component!r} needs a version after it")
        constraints.append((op, ".".join(tokens[i + 1 : j])))
        i = j
    canonical_constraints = sorted(set(constraints))
    spec = _build_spec(name, canonical_constraints)
    return _Component(_join_component(name, canonical_constraints), spec)


def _unknown_operator(name_tokens: Sequence[str]) -> str | None:
    """A word in operator position that is not an operator (`xz.gtx.1`, `numpy.geq.1`).

    Package names keep their dots (`ruamel.yaml`), so any word could be part of a name;
    but a later all-letter word followed by a part that starts with a digit reads as a
    mistyped operator, and answering NAME_INVALID beats solving for `xz.gtx.1`.
    """
    for word, after in zip(name_tokens[1:], name_tokens[2:]):
        if word.isalpha() and after[:1].isdigit():
            return word
    return None


def _join_component(name: str, constraints: Sequence[tuple[str, str]]) -> str:
    return ".".join([name, *(f"{op}.{version}" for op, version in constraints)])


def component_to_spec(component: str) -> str:
    """The conda spec of one component: "numpy.ge.1.20.lt.2" -> "numpy >=1.20,<2".

    Raises ValueError when the component does not parse.
    """
    return _parse_component(component).spec


def spec_to_component(name: str, constraints: Sequence[tuple[str, str]]) -> str:
    """The component for a package name and (op, version) constraints, op in OPERATORS.

    Inverse of `component_to_spec`. Raises ValueError for what a component cannot
    express: an operator word after the name's first dot or inside a version, or
    characters outside the OCI grammar.
    """
    for op, version in constraints:
        if op not in OPERATORS:
            raise ValueError(f"unknown operator {op!r}; expected one of {' '.join(OPERATORS)}")
        if not version or any(part in OPERATORS for part in version.split(".")):
            raise ValueError(f"version {version!r} cannot be written in an image name")
    if any(part in OPERATORS for part in name.split(".")[1:]) or _unknown_operator(name.split(".")):
        raise ValueError(f"package name {name!r} cannot be written in an image name")
    component = _join_component(name, sorted(set(constraints)))
    parsed = _parse_component(component)  # validates grammar and conda syntax
    return parsed.canonical


_SPEC_RE = re.compile(r"([A-Za-z0-9_.\-]+)(.*)", re.DOTALL)
_CONSTRAINT_RE = re.compile(r"(==|!=|>=|<=|>|<|=)?([^=!<>]+)")
_OPERATOR_WORDS = {"==": "eq", "=": "eq", None: "eq", "!=": "ne", ">=": "ge", ">": "gt", "<=": "le", "<": "lt"}
_CHANNEL_PREFIX_RE = re.compile(r"([^:\s]+)::(.+)", re.DOTALL)
# Characters of conda's spec syntax that the OCI grammar has no room for.
_CONDA_SYNTAX = set("=<>!: *,|[]") | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def spec_component(text: str) -> str:
    """The name component of one conda spec; ValueError says why there is none."""
    match = _SPEC_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError("expected a package name, optionally followed by constraints such as >=1.26")
    package, rest = match.group(1).lower(), match.group(2)
    if "|" in rest:
        raise ValueError("alternatives (|) cannot be written in an image name: pick one")
    if any(c in rest for c in "[]:"):
        raise ValueError("brackets and channel prefixes cannot be written in an image name")
    # Spaces around operators and commas are decoration; one left between words is a build
    # string, and so is a third part of conda's `name=version=build`.
    rest = re.sub(r"\s*([,<>=!])\s*", r"\1", rest.strip())
    if re.search(r"\s", rest) or re.fullmatch(r"==?[^=<>!,]+=[^=<>!,]+", rest):
        raise ValueError("a build string cannot be written in an image name; give versions only")
    constraints: list[tuple[str, str]] = []
    for piece in filter(None, rest.split(",")):
        constraint = _CONSTRAINT_RE.fullmatch(piece)
        if constraint is None:
            raise ValueError(f"cannot read the constraint {piece[:40]!r}")
        operator, version = constraint.groups()
        if operator in (None, "=", "==") and version.endswith(".*"):
            version = version[:-2]  # `1.*` is what eq means already
        if version == "*":
            continue
        if "*" in version:
            raise ValueError(f"wildcards inside a version ({version[:40]!r}) cannot be written; use 1.* or ge/lt")
        constraints.append((_OPERATOR_WORDS[operator], version))
    return spec_to_component(package, constraints)


def conda_spelling(component: str) -> tuple[str | None, str]:
    """For a component written in conda's syntax: (its component, a sentence saying how to
    write it), or (None, why it cannot be written). ("", "") when it is not conda syntax.

    `conda-forge::numpy` -> numpy: a name cannot choose a channel, the registry's
    configuration does. `numpy==1.26` -> numpy.eq.1.26 like the composer, with a word on
    the difference (eq is fuzzy, 1.26.*; == is exact).
    """
    if not _CONDA_SYNTAX & set(component):
        return None, ""
    spec, channel_note = component, ""
    prefixed = _CHANNEL_PREFIX_RE.fullmatch(component)
    if prefixed is not None:
        spec = prefixed.group(2)
        channel_note = (f"; an image name cannot choose a channel ({_quoted(prefixed.group(1) + '::', 40)}): "
                        "the registry's configured channels are searched")
    try:
        fixed = spec_component(spec)
    except ValueError as exc:
        return None, f"component {_quoted(component)} does not match the OCI name grammar; as a conda spec: {exc}"
    if _CONDA_SYNTAX & set(component.lower()):
        sentence = (f"component {_quoted(component)} is conda syntax, not the OCI name grammar; "
                    f"in an image name write {fixed}{channel_note}")
    else:
        sentence = f"component {_quoted(component)} does not match the OCI name grammar (lowercase): write {fixed}"
    if "==" in spec and ".eq." in fixed:
        version = fixed.split(".eq.", 1)[1]
        sentence += f" (eq matches {version}.*; exactly {version} is {fixed.replace('.eq.', '.ge.', 1)}.le.{version})"
    return fixed, sentence


def _conda_hint(name: str, part: str, meta_packages: Mapping[str, MetaPackage]) -> str | None:
    """The NAME_INVALID reason for a component in conda syntax, with the whole name
    rewritten when every such component of it can be; None when `part` is not conda syntax."""
    fixed, sentence = conda_spelling(part)
    if not sentence:
        return None
    if fixed is not None:
        parts = [conda_spelling(p)[0] or p for p in name.split("/")]
        try:
            whole = parse_name("/".join(parts), meta_packages).canonical_name
        except NameInvalid:
            return sentence
        if whole != fixed:
            sentence += f"; the image: {whole}"
    return sentence


def parse_name(name: str, meta_packages: Mapping[str, MetaPackage]) -> ImageRequest:
    """The image request a repository name stands for. Raises NameInvalid."""
    if not isinstance(name, str) or not name:
        raise _invalid(str(name), "the name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise _invalid(name, f"longer than {MAX_NAME_LENGTH} characters")
    canonical: set[str] = set()
    specs: set[str] = set()
    meta: set[str] = set()
    for part in name.split("/"):
        if not part:
            raise _invalid(name, "empty component (leading, trailing or double '/')")
        if not COMPONENT_RE.fullmatch(part):
            hint = _conda_hint(name, part, meta_packages)
            raise _invalid(name, hint or f"component {_quoted(part)} does not match the OCI name grammar")
        package = meta_packages.get(part)
        if package is not None:
            canonical.add(part)
            meta.add(part)
            specs.update(package.specs)
            continue
        try:
            parsed = _parse_component(part)
        except ValueError as exc:
            raise _invalid(name, str(exc)) from None
        canonical.add(parsed.canonical)
        specs.add(parsed.spec)
    if meta:
        try:
            # Their specs, with what their settings add (a changeable environment's package managers).
            specs.update(combine_meta_packages({m: meta_packages[m] for m in meta}).specs)
        except MetaConflict as exc:
            raise NameInvalid(f"invalid image name {_quoted(name)}: {exc}") from None
    components = tuple(sorted(canonical))
    return ImageRequest(
        canonical_name="/".join(components),
        components=components,
        specs=tuple(sorted(specs)),
        meta=tuple(sorted(meta)),
    )


# -- environment names -------------------------------------------------------------------
_ENV_ID_RE = re.compile(rf"[0-9a-f]{{{ID_LENGTH}}}")


def parse_environment_name(name: str) -> tuple[str, str] | None:
    """("env", id) for `env/<id>`, ("envs", name) for `envs/<name>`, None for any other
    name (a list of specs). Raises NameInvalid for a malformed environment name."""
    head, sep, rest = name.partition("/")
    if not sep or head not in ("env", "envs") or "/" in rest:
        return None
    if head == "env" and not _ENV_ID_RE.fullmatch(rest):
        raise NameInvalid(f"invalid image name {name[:80]!r}: env/<id> names a pushed environment, "
                          f"<id> being the {ID_LENGTH} hex digits POST /api/v1/environments answered")
    if not COMPONENT_RE.fullmatch(rest):
        raise NameInvalid(f"invalid image name {name[:80]!r}: envs/<name> names a file of the environments folder")
    return head, rest


def environment_request(name: str, environment: Environment) -> ImageRequest:
    """The image request of an environment served as `name` (`env/<id>`, `envs/<name>`)."""
    components = tuple(name.split("/"))
    specs = environment.specs if environment.locked is None else tuple(
        sorted(f"{n} =={v} {b}" for packages in environment.locked.values()
               for n, v, b in (archive_name(p.file_name) for p in packages)))
    return ImageRequest(canonical_name=name, components=components, specs=specs, meta=(), environment=environment)


def kernel_request(kernel: Kernel) -> ImageRequest:
    """What a kernel's environment is built from: its file, with its kernel package added."""
    environment = kernel.environment
    if environment.locked is None:
        environment = replace(environment, specs=kernel_specs(environment))
    return environment_request(f"envs/{kernel.name}", environment)
