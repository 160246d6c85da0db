"""Kernels (build/kernels.py, image/environment.py): kernelspecs as Jupyter reads them, the
kernel package added where the file lacks it, `kernels:` in configuration, and the image
key following each kernel environment's content."""

from __future__ import annotations

import json

import pytest

from condery.build.kernels import kernelspec, kernelspec_files
from condery.config import ConfigError, load_config
from condery.image.environment import Kernel, kernel_specs, read_environment
from condery.layers.activation import Activation
from condery.records.keys import ImageKeys

PYTHON_ENV = read_environment("name: Team A\ndependencies: [python=3.11, numpy]\nvariables: {TEAM: a}\n")
R_ENV = read_environment("dependencies: [r-base, r-ggplot2]\n")
TOOLS_ENV = read_environment("dependencies: [xz, git]\n")


def test_a_python_kernel_runs_its_own_python_with_its_environment() -> None:
    activation = Activation({"PROJ_DATA": "/opt/conda/envs/team-a/share/proj"}, ("/opt/conda/envs/team-a/x",), (), "bwrap")
    spec = kernelspec(Kernel("team-a", PYTHON_ENV), "/opt/conda", activation)
    assert spec is not None
    assert spec["argv"] == ["/opt/conda/envs/team-a/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["display_name"] == "Team A" and spec["language"] == "python"
    env = spec["env"]
    assert env["CONDA_PREFIX"] == "/opt/conda/envs/team-a" and env["TEAM"] == "a"
    assert env["PROJ_DATA"] == "/opt/conda/envs/team-a/share/proj"
    assert env["PATH"].startswith("/opt/conda/envs/team-a/x:/opt/conda/envs/team-a/bin:/opt/conda/bin:")


def test_an_r_environment_gets_irkernel_and_a_tools_one_no_kernel() -> None:
    r = Kernel("stats", R_ENV)
    assert r.language == "R" and "r-irkernel" in kernel_specs(R_ENV)
    assert kernelspec(r, "/opt/conda")["argv"][0] == "/opt/conda/envs/stats/bin/R"  # type: ignore[index]
    tools = Kernel("tools", TOOLS_ENV)
    assert tools.language is None and kernelspec(tools, "/opt/conda") is None
    assert kernel_specs(TOOLS_ENV) == TOOLS_ENV.specs
    assert "ipykernel" in kernel_specs(PYTHON_ENV) and "ipykernel" not in PYTHON_ENV.specs
    files = kernelspec_files([(r, Activation({}, (), (), "none")), (tools, Activation({}, (), (), "none"))], "/opt/conda")
    assert list(files) == ["share/jupyter/kernels/stats/kernel.json"]
    assert json.loads(files["share/jupyter/kernels/stats/kernel.json"])["language"] == "R"


def test_kernels_in_configuration() -> None:
    config = load_config(None, environ={}, meta_packages={"lab": {"specs": ["jupyterlab"], "kernels": "all"},
                                                          "two": {"specs": ["x"], "kernels": ["team-a", "env/" + "0" * 32]}})
    assert config.meta_packages["lab"].kernels == ("all",)
    assert config.meta_packages["two"].kernels == ("team-a", "env/" + "0" * 32)
    with pytest.raises(ConfigError, match=r"meta_packages.bad.kernels\[0\].*not an environment name"):
        load_config(None, environ={}, meta_packages={"bad": {"specs": ["x"], "kernels": ["Team A"]}})


def test_the_image_key_follows_each_kernel_environment() -> None:
    from dataclasses import replace

    from condery.image.names import parse_name

    config = load_config(None, environ={}, meta_packages={"lab": {"specs": ["jupyterlab"], "kernels": "all"}})
    keys = ImageKeys(config)
    request = parse_name("lab", config.meta_packages)
    first = keys.key(replace(request, kernels=(Kernel("team-a", PYTHON_ENV),)), "latest", {})
    edited = read_environment("name: Team A\ndependencies: [python=3.11, numpy, scipy]\nvariables: {TEAM: a}\n")
    second = keys.key(replace(request, kernels=(Kernel("team-a", edited),)), "latest", {})
    assert first != second
    assert keys.key(replace(request, kernels=(Kernel("team-a", PYTHON_ENV),)), "latest", {}) == first


def test_the_readme_kernels_configuration_loads_as_written() -> None:
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**Kernels: several environments in one image.**", 1)[1]
    block = re.search(r"^```yaml\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)
    config = load_config(None, environ={}, **yaml.safe_load(block))
    assert config.meta_packages["lab"].kernels == ("all",) and config.meta_packages["lab"].user is not None
