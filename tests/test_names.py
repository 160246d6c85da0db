"""Image names -> conda specs (DESIGN.md "Names")."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from condery.image.meta import DEFAULT_META_PACKAGES, MetaPackage
from condery.oci.errors import NameInvalid
from condery.image.names import (
    OPERATORS,
    component_to_spec,
    parse_name,
    spec_to_component,
)
from condery.oci.grammar import COMPONENT_RE

METAS = dict(DEFAULT_META_PACKAGES)
SYMBOLS = {"ne": "!=", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}


@pytest.mark.parametrize(
    ("component", "spec"),
    [
        ("numpy", "numpy"),
        ("scipy.gt.1.0", "scipy >1.0"),
        ("python.eq.3.11", "python 3.11.*"),
        ("numpy.ge.1.20.lt.2", "numpy >=1.20,<2"),
        ("numpy.lt.2.ge.1.20", "numpy >=1.20,<2"),  # constraint order does not matter
        ("libblas.ne.3.9.0", "libblas !=3.9.0"),
        ("ruamel.yaml", "ruamel.yaml"),
        ("ruamel.yaml.ge.0.17", "ruamel.yaml >=0.17"),
        ("python-dateutil.le.2.8.2", "python-dateutil <=2.8.2"),
        ("openssl.ge.3.0.13", "openssl >=3.0.13"),
        ("numpy.ge.1.20.ge.1.20", "numpy >=1.20"),  # duplicate constraints collapse
    ],
)
def test_component_to_spec(component: str, spec: str) -> None:
    assert component_to_spec(component) == spec


def test_contract_examples_and_canonical_name() -> None:
    request = parse_name("scipy.gt.1.0/python.eq.3.11/numpy/numpy", METAS)
    assert request.canonical_name == "numpy/python.eq.3.11/scipy.gt.1.0"
    assert request.components == ("numpy", "python.eq.3.11", "scipy.gt.1.0")
    assert request.specs == ("numpy", "python 3.11.*", "scipy >1.0")
    assert request.meta == ()


def test_order_and_duplicates_do_not_matter() -> None:
    a = parse_name("scipy/numpy", METAS)
    b = parse_name("numpy/scipy/numpy", METAS)
    assert a == b
    c = parse_name("numpy.lt.2.ge.1.20", METAS)
    assert c.canonical_name == "numpy.ge.1.20.lt.2"
    assert parse_name(c.canonical_name, METAS) == c


def test_meta_packages_contribute_their_specs() -> None:
    metas = {**METAS, "sci": MetaPackage(specs=("numpy", "scipy >1"))}
    request = parse_name("sci/shell/numpy", metas)
    assert request.meta == ("sci", "shell")
    assert request.components == ("numpy", "sci", "shell")
    assert request.specs == tuple(sorted({"numpy", "scipy >1", *DEFAULT_META_PACKAGES["shell"].specs}))
    # With an operator, a meta-package's name is an ordinary package name.
    assert parse_name("shell.gt.1", metas).specs == ("shell >1",)


def test_meta_packages_that_disagree_are_a_name_error() -> None:
    # Components have no order, so neither can win: the name is refused, naming both.
    metas = {**METAS, "lab": MetaPackage(specs=("python",), cmd=("jupyter", "lab")),
             "tools": MetaPackage(specs=("git",), env={"EDITOR": "vi"}),
             "nano": MetaPackage(specs=("nano",), env={"EDITOR": "nano"})}
    with pytest.raises(NameInvalid, match="meta-packages 'jupyter' and 'lab' set cmd differently"):
        parse_name("lab/jupyter", metas)
    with pytest.raises(NameInvalid, match="'nano' and 'tools' set env EDITOR differently"):
        parse_name("tools/nano", metas)
    # Settings that agree, or that only one of them gives, combine.
    assert parse_name("jupyter/shell/tools/numpy", metas).meta == ("jupyter", "shell", "tools")


def test_package_named_like_an_operator() -> None:
    # The first token is always the package name, so packages called eq, ge, ... work.
    assert component_to_spec("ge") == "ge"
    assert component_to_spec("eq.eq.1") == "eq 1.*"
    assert component_to_spec("lt.gt.1.lt.2") == "lt >1,<2"
    assert spec_to_component("ge", [("gt", "1")]) == "ge.gt.1"
    # After the first dot an operator word always starts a constraint: such a dotted
    # package name or such a version cannot be expressed, and the inverse refuses it.
    with pytest.raises(ValueError):
        spec_to_component("foo.lt", [])
    with pytest.raises(ValueError):
        spec_to_component("foo", [("ge", "1.eq")])
    # And the name reads as constraints (or is refused), never silently as that package.
    assert component_to_spec("foo.lt.2") == "foo <2"
    with pytest.raises(NameInvalid):
        parse_name("foo.lt", METAS)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/numpy",
        "numpy/",
        "numpy//scipy",
        "Numpy",
        "numpy:latest",
        "numpy.ge",  # operator without a version
        "numpy.ge.lt.2",  # operator followed by an operator
        "numpy..ge.1",
        "-numpy",
        "numpy_",
        "numpy.gt.1--2",  # grammar allows --, conda's version grammar does not
        "a" * 256,
        "numpy\n",
        "n\u00fcmpy",
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(NameInvalid) as info:
        parse_name(name, METAS)
    assert info.value.status == 400 and info.value.code == "NAME_INVALID"
    # The message shows the grammar so that a user can fix the name.
    assert "numpy.ge.1.20.lt.2" in info.value.message
    assert "eq ne gt ge lt le" in info.value.message


def test_spec_to_component_validates() -> None:
    assert spec_to_component("numpy", [("lt", "2"), ("ge", "1.20")]) == "numpy.ge.1.20.lt.2"
    with pytest.raises(ValueError):
        spec_to_component("numpy", [("==", "1")])
    with pytest.raises(ValueError):
        spec_to_component("NumPy", [])
    with pytest.raises(ValueError):
        spec_to_component("numpy", [("ge", "")])


# -- properties ----------------------------------------------------------------------

_word = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True).filter(lambda w: w not in OPERATORS)
_name_token = st.from_regex(r"[a-z][a-z0-9]{0,5}(?:[-_][a-z0-9]{1,4})?", fullmatch=True).filter(
    lambda w: w not in OPERATORS
)
_package = st.builds(
    lambda first, rest: ".".join([first, *rest]),
    st.from_regex(r"[a-z0-9]{1,6}(?:-[a-z0-9]{1,4})?", fullmatch=True),  # may be an operator word
    st.lists(_name_token, max_size=2),
)
_version = st.builds(
    lambda parts: ".".join(parts), st.lists(st.from_regex(r"[0-9]{1,4}", fullmatch=True), min_size=1, max_size=3)
) | st.builds(lambda a, b: f"{a}.{b}", st.from_regex(r"[0-9]{1,3}", fullmatch=True), _word.filter(lambda w: w[0].isdigit()))
_constraint = st.tuples(st.sampled_from(sorted(OPERATORS)), _version)
_spec = st.tuples(_package, st.lists(_constraint, max_size=3))


def _expected_spec(name: str, constraints: list[tuple[str, str]]) -> str:
    """Written independently of names.py: the table in DESIGN.md."""
    parts = [f"{v}.*" if op == "eq" else SYMBOLS[op] + v for op, v in sorted(set(constraints))]
    return name + (" " + ",".join(parts) if parts else "")


@settings(max_examples=150, deadline=None)
@given(st.lists(_spec, min_size=1, max_size=5))
def test_specs_roundtrip_through_names(specs: list[tuple[str, list[tuple[str, str]]]]) -> None:
    components = [spec_to_component(name, constraints) for name, constraints in specs]
    name = "/".join(components)
    if len(name) > 255:
        return
    request = parse_name(name, {})
    assert request.specs == tuple(sorted({_expected_spec(n, c) for n, c in specs}))
    assert all(COMPONENT_RE.fullmatch(c) for c in request.components)
    # The canonical name is a fixed point and stands for the same image.
    assert parse_name(request.canonical_name, {}) == request
    assert parse_name("/".join(reversed(components)), {}) == request


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"[a-z0-9._/-]{0,80}", fullmatch=True))
def test_arbitrary_text_only_raises_name_invalid(text: str) -> None:
    try:
        request = parse_name(text, METAS)
    except NameInvalid as exc:
        assert exc.status == 400
        return
    assert request.components and len(request.canonical_name) <= 255
    for component in request.components:
        assert re.fullmatch(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*", component)


# Pieces that stress the operator and separator rules: operator words in every position,
# runs of separators, digits where names go, near-misses of operators.
_piece = st.sampled_from(
    [*OPERATORS, "1", "0", "01", "a", "numpy", "gtx", "geq", "-", "--", "_", "__", "___", ".", "..", "/", "//", "*", "!"]
)
_hostile_name = st.lists(_piece, min_size=1, max_size=80).map("".join)


@settings(max_examples=800, deadline=None)
@given(_hostile_name | st.text(min_size=200, max_size=2000) | st.text(alphabet="a.-_/0gtlqe", max_size=400))
def test_hostile_names_only_raise_name_invalid_with_a_short_message(text: str) -> None:
    try:
        request = parse_name(text, METAS)
    except NameInvalid as exc:
        assert exc.status == 400 and exc.code == "NAME_INVALID"
        # The name is quoted in part: a 2,000-character name does not make a 2 KB error.
        assert len(exc.message) < 1000, len(exc.message)
        return
    assert request.components == tuple(sorted(set(request.components)))
    assert len(request.canonical_name) <= len(text)
    assert parse_name(request.canonical_name, METAS) == request


# -- conda syntax in a name: the NAME_INVALID says how to write it -----------------------
@pytest.mark.parametrize(
    ("typed", "spelling"),
    [
        ("numpy=1.26", "write numpy.eq.1.26"),
        ("numpy==1.26", "write numpy.eq.1.26 (eq matches 1.26.*; exactly 1.26 is numpy.ge.1.26.le.1.26)"),
        ("numpy>=1.26", "write numpy.ge.1.26"),
        ("numpy<2", "write numpy.lt.2"),
        ("numpy 1.26", "write numpy.eq.1.26"),
        ("numpy >=1.20,<2", "write numpy.ge.1.20.lt.2"),
        ("numpy!=1.26.0", "write numpy.ne.1.26.0"),
        ("conda-forge::numpy", "write numpy; an image name cannot choose a channel ('conda-forge::')"),
        ("NumPy", "(lowercase): write numpy"),
    ],
)
def test_conda_syntax_gets_the_condery_spelling(typed: str, spelling: str) -> None:
    with pytest.raises(NameInvalid) as err:
        parse_name(typed, METAS)
    assert spelling in err.value.message
    assert "operators eq ne gt ge lt le" in err.value.message  # the grammar is still shown


def test_the_whole_name_is_rewritten_when_every_component_can_be() -> None:
    with pytest.raises(NameInvalid) as err:
        parse_name("python=3.11/numpy>=1.26,<2/scipy", METAS)
    assert "the image: numpy.ge.1.26.lt.2/python.eq.3.11/scipy" in err.value.message
    # ... and that name is one the registry reads, to the specs typed.
    assert parse_name("numpy.ge.1.26.lt.2/python.eq.3.11/scipy", METAS).specs == (
        "numpy >=1.26,<2", "python 3.11.*", "scipy")


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("numpy=1.26=py311_0", "a build string cannot be written"),
        ("numpy 1.26 py311_0", "a build string cannot be written"),
        ("numpy[version=1]", "brackets and channel prefixes cannot be written"),
        ("numpy>=1|<0.5", "alternatives (|) cannot be written"),
    ],
)
def test_conda_syntax_that_a_name_cannot_hold_says_why(typed: str, reason: str) -> None:
    with pytest.raises(NameInvalid) as err:
        parse_name(typed, METAS)
    assert f"as a conda spec: {reason}" in err.value.message


def test_a_name_that_is_not_conda_syntax_keeps_the_grammar_message() -> None:
    with pytest.raises(NameInvalid) as err:
        parse_name("numpy..ge", METAS)
    assert "does not match the OCI name grammar" in err.value.message
    assert "conda" not in err.value.message


@given(st.text(alphabet="abcAB0123456789.=<>!:, *|[]_-", min_size=1, max_size=60))
@settings(max_examples=300, deadline=None)
def test_any_typed_component_gets_name_invalid_of_bounded_size_or_parses(typed: str) -> None:
    try:
        parse_name(typed, METAS)
    except NameInvalid as err:
        assert len(err.message) < 1200
        # A spelling offered is one the registry reads.
        match = re.search(r"in an image name write (\S+?)[;( ]", err.message + " ")
        if match:
            parse_name(match.group(1), METAS)
