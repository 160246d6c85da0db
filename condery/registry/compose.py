"""From conda specs as people type them to an image name (the landing page's composer).

    numpy>=1.26        -> numpy.ge.1.26
    scipy 1.*          -> scipy.eq.1          (eq is fuzzy: 1.*)
    python=3.11        -> python.eq.3.11
    numpy >=1.20,<2    -> numpy.ge.1.20.lt.2
    jupyter            -> jupyter             (a configured meta-package)

Built on names.py's `spec_to_component` and `parse_name`, so a composed name always
parses back to the specs it came from, and the server is the one place that knows the
grammar (the page's script asks `/api/v1/compose` instead of repeating it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from condery.registry.errors import NameInvalid
from condery.registry.names import parse_name, spec_to_component

if TYPE_CHECKING:
    from condery.config import MetaPackage

MAX_SPECS = 100  # more lines than any image name of 255 characters can hold
_SPEC_RE = re.compile(r"([A-Za-z0-9_.\-]+)(.*)", re.DOTALL)
_CONSTRAINT_RE = re.compile(r"(==|!=|>=|<=|>|<|=)?([^=!<>]+)")
_OPERATOR_WORDS = {"==": "eq", "=": "eq", None: "eq", "!=": "ne", ">=": "ge", ">": "gt", "<=": "le", "<": "lt"}


@dataclass(frozen=True)
class Composed:
    name: str | None  # the canonical image name; None when nothing (valid) was typed
    problems: list[tuple[str, str]] = field(default_factory=list)  # (typed line, why it cannot be named)


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
    # Spaces around operators and commas are decoration; one left between words is a build string.
    rest = re.sub(r"\s*([,<>=!])\s*", r"\1", rest.strip())
    if re.search(r"\s", rest):
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


def compose(text: str, meta_packages: Mapping[str, "MetaPackage"]) -> Composed:
    """The image name for specs typed one per line (meta-package names welcome)."""
    components: list[str] = []
    problems: list[tuple[str, str]] = []
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines[:MAX_SPECS]:
        if line in meta_packages:
            components.append(line)
            continue
        try:
            components.append(spec_component(line))
        except ValueError as exc:
            problems.append((line, str(exc)))
    if len(lines) > MAX_SPECS:
        problems.append((lines[MAX_SPECS], f"at most {MAX_SPECS} specs"))
    if not components:
        return Composed(None, problems)
    try:
        return Composed(parse_name("/".join(components), meta_packages).canonical_name, problems)
    except NameInvalid as exc:
        return Composed(None, [*problems, ("/".join(components)[:80], exc.message)])
