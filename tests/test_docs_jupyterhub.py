"""docs/jupyterhub.md as written: its code blocks are extracted and checked, so the doc
is what is tested. YAML parses, the pod validates against the Kubernetes schemas
(kubernetes-validate, offline), the condery configuration loads, the Python compiles,
and every image named is a condery name that parses with the configuration's meta-packages."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from condery.image.meta import DEFAULT_META_PACKAGES
from condery.config import load_config
from condery.image.names import parse_name
from tests.test_deploy import k8s_errors

DOC = Path(__file__).resolve().parent.parent / "docs" / "jupyterhub.md"
HOST = "condery.example.org/"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), flags=re.MULTILINE | re.DOTALL)


def images(node: Any) -> Iterator[str]:
    """Every `image:` string (or `{name, tag}` mapping) in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            elif key == "image" and isinstance(value, dict):
                yield f"{value['name']}:{value['tag']}"
            else:
                yield from images(value)
    elif isinstance(node, list):
        for item in node:
            yield from images(item)


def check_condery_name(reference: str) -> None:
    assert reference.startswith(HOST), reference
    name, _, tag = reference[len(HOST):].rpartition(":")
    assert tag == "latest" or re.fullmatch(r"\d{4}-\d{2}-\d{2}", tag), reference
    request = parse_name(name, DEFAULT_META_PACKAGES)
    assert "jupyter" in request.meta, reference  # every example is a notebook image


def test_yaml_blocks() -> None:
    documents = [yaml.safe_load(text) for text in blocks("yaml")]
    by_kind = {("Pod" if d.get("kind") == "Pod" else next(iter(d))): d for d in documents}
    assert set(by_kind) == {"meta_packages", "singleuser", "Pod"}

    # The condery configurations load, and their meta-packages are what the doc says: a
    # user for `lab`, and `jupyter` as the defaults but not changeable.
    configs = [load_config(None, environ={}, **d) for d in documents if "meta_packages" in d]
    assert len(configs) == 2
    lab = configs[0].meta_packages["lab"]
    assert lab.user is not None and lab.user.uid == 1000
    fixed, default = configs[1].meta_packages["jupyter"], DEFAULT_META_PACKAGES["jupyter"]
    assert fixed.changeable is False and default.changeable is True
    assert (fixed.specs, fixed.user, fixed.workdir, fixed.cmd) == (default.specs, default.user, default.workdir,
                                                                    default.cmd)

    singleuser = by_kind["singleuser"]["singleuser"]
    assert (singleuser["uid"], singleuser["fsGid"]) == (1000, 100)  # what `jupyter` sets
    assert len(singleuser["profileList"]) >= 3
    pod = by_kind["Pod"]
    assert k8s_errors(pod) == []
    names = [*images(singleuser), *images(pod)]
    assert len(names) >= 5
    for reference in names:
        check_condery_name(reference)


def test_kubespawner_block() -> None:
    (source,) = blocks("python")
    tree = ast.parse(source)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    names = [s for s in strings if s.startswith(HOST)]
    assert len(names) == 2
    for reference in names:
        check_condery_name(reference)
    assert "c.KubeSpawner.uid = 1000" in source


def test_the_pod_check_can_fail() -> None:
    pod = yaml.safe_load(next(t for t in blocks("yaml") if "kind: Pod" in t))
    pod["spec"]["containers"][0]["args"] = "jupyter-lab"  # a string where a list belongs
    assert k8s_errors(pod)
