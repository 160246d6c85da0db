"""From conda specs as people type them to an image name (the landing page's composer).

    numpy>=1.26        -> numpy.ge.1.26
    scipy 1.*          -> scipy.eq.1          (eq is fuzzy: 1.*)
    python=3.11        -> python.eq.3.11
    numpy >=1.20,<2    -> numpy.ge.1.20.lt.2
    jupyter            -> jupyter             (a configured meta-package)

Built on names.py's `spec_component` and `parse_name`, so a composed name always
parses back to the specs it came from, and the server is the one place that knows the
grammar (the page's script asks `/api/v1/compose` instead of repeating it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from condery.image.meta import MetaPackage
from condery.image.names import parse_name, spec_component
from condery.oci.errors import NameInvalid

MAX_SPECS = 100  # more lines than any image name of 255 characters can hold


@dataclass(frozen=True)
class Composed:
    name: str | None  # the canonical image name; None when nothing (valid) was typed
    problems: list[tuple[str, str]] = field(default_factory=list)  # (typed line, why it cannot be named)


def compose(text: str, meta_packages: Mapping[str, MetaPackage]) -> Composed:
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
