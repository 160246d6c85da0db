"""Activation scripts evaluated at build time (layers/activation.py): real conda-forge
scripts from tests/data/activate.d (PROVENANCE there), hostile ones, the static fallback,
what the layer record keeps, and what reaches the image (env layer, config)."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from condery.build.assembly import image_settings
from condery.config import load_config
from condery.image.names import parse_name
from condery.layers.activation import (
    Activation,
    Sandbox,
    Verdict,
    evaluate_activation,
    evaluate_static,
    image_scripts,
    probes,
)
from condery.layers.activation_scripts import PackageScripts, digests_of, read_package_scripts
from condery.oci.manifest import image_config
from condery.oci.platforms import oci_platform
from condery.records.schemas import LayerEntry
from tests.fixtures.channel import write_activation_packages

DATA = Path(__file__).parent / "data" / "activate.d"
PREFIX = "/opt/conda"
DIGEST = "sha256:" + "a" * 64


def real(name: str) -> tuple[str, str]:
    return f"{name}.sh", (DATA / f"{name}-activate.sh").read_text()


def package(*paths: str, scripts: tuple = (), programs: tuple = ()) -> PackageScripts:
    return PackageScripts(tuple((n, t, "") for n, t in scripts), (), programs, digests_of(paths))


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    box = Sandbox()
    reason = asyncio.run(box.why_unusable())
    if reason is not None:
        pytest.skip(f"no sandbox here: {reason}")
    return box


def evaluate(box: Sandbox, packages: list[PackageScripts]) -> Activation:
    return asyncio.run(evaluate_activation(packages, PREFIX, box))


# -- real scripts -----------------------------------------------------------------------

def test_proj_sees_proj_data_s_licence_in_another_package(sandbox: Sandbox) -> None:
    proj = package("share/proj/proj.db", scripts=[real("proj")])
    proj_data = package("share/proj/copyright_and_licenses.csv", "share/proj/us_noaa.tif")
    alone = evaluate(sandbox, [proj])
    assert dict(alone.env) == {"PROJ_DATA": f"{PREFIX}/share/proj", "PROJ_NETWORK": "ON"}
    both = evaluate(sandbox, [proj, proj_data])
    assert dict(both.env) == {"PROJ_DATA": f"{PREFIX}/share/proj", "PROJ_NETWORK": "OFF"}
    assert both.verdicts == (Verdict("proj.sh", True),) and not both.needs_entrypoint


def test_gdal_saves_the_old_value_and_drops_a_missing_plugin_directory(sandbox: Sandbox) -> None:
    gdal = package("share/gdal/gdalvrt.xsd", scripts=[real("gdal")])
    activation = evaluate(sandbox, [gdal])
    # _CONDA_SET_* is bookkeeping, GDAL_DRIVER_PATH is unset when lib/gdalplugins is absent.
    assert dict(activation.env) == {"GDAL_DATA": f"{PREFIX}/share/gdal", "CPL_ZIP_ENCODING": "UTF-8"}
    with_plugins = evaluate(sandbox, [package("share/gdal/x", "lib/gdalplugins/a.so", scripts=[real("gdal")])])
    assert with_plugins.env["GDAL_DRIVER_PATH"] == f"{PREFIX}/lib/gdalplugins"


def test_every_real_script_gets_its_verdict(sandbox: Sandbox) -> None:
    pkgs = [package("share/udunits/udunits2.xml", "lib/jvm/bin/java", "bin/R",
                    scripts=[real(n) for n in ("udunits2", "openjdk", "libxml2", "r-base", "julia")],
                    programs=("R",))]
    activation = evaluate(sandbox, pkgs)
    verdicts = {v.name: v for v in activation.verdicts}
    assert [n for n, v in verdicts.items() if v.static] == ["libxml2.sh", "openjdk.sh", "udunits2.sh"]
    assert "runs R" in verdicts["r-base.sh"].reason  # `R CMD javareconf`: a program of the image
    assert "unknown operand" in verdicts["julia.sh"].reason  # bash's [[ ... == pattern ]]
    assert activation.env["UDUNITS2_XML_PATH"] == f"{PREFIX}/share/udunits/udunits2.xml"
    assert activation.env["JAVA_HOME"] == f"{PREFIX}/lib/jvm"
    assert activation.env["XML_CATALOG_FILES"] == f"file://{PREFIX}/etc/xml/catalog file:///etc/xml/catalog"
    assert "JAVA_HOME_CONDA_BACKUP" not in activation.env and "RSTUDIO_WHICH_R" not in activation.env
    assert activation.needs_entrypoint


def test_the_static_evaluator_agrees_where_it_can(sandbox: Sandbox) -> None:
    pkgs = [package("share/proj/proj.db", "share/gdal/x", "share/udunits/u.xml", "lib/jvm/x")]
    for name in ("proj", "gdal", "udunits2", "openjdk"):
        scripts = [real(name)]
        static = evaluate_static(scripts, PREFIX, probes(scripts, pkgs))
        boxed = asyncio.run(sandbox.evaluate(scripts, PREFIX, probes(scripts, pkgs)))
        assert static.verdicts[0].static and boxed.verdicts[0].static, name
        assert dict(static.env) == dict(boxed.env), name
    for name in ("libxml2", "julia", "r-base"):  # a loop, ${VAR##*/}, a redirection
        static = evaluate_static([real(name)], PREFIX)
        assert not static.verdicts[0].static and "outside the static subset" in static.verdicts[0].reason


# -- hostile scripts --------------------------------------------------------------------

def test_hostile_scripts_leak_nothing_and_do_not_hang(sandbox: Sandbox, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-42\n")
    hostile = [
        ("09-read.sh", f'export LEAK_FILE="$(cat {secret} /etc/shadow /etc/hostname 2>&1)"\n'),
        ("10-read.sh", 'export LEAK_SHADOW="$(cat /etc/shadow)"\n'),
        ("11-net.sh", 'export LEAK_NET="$(nc -w 2 127.0.0.1 22 </dev/null; wget -q -T 2 -O - http://10.0.0.1/)"\n'),
        ("12-loop.sh", "while :; do :; done\n"),
        ("13-fork.sh", "while :; do sleep 100 & done\n"),
        ("14-exit.sh", "exit 3\n"),
        ("15-big.sh", 'x=y; while :; do x="$x$x"; export BIG="$x"; done\n'),
        ("16-write.sh", f'echo hi > {PREFIX}/etc/planted; echo hi > /planted\n'),
        ("17-host.sh", 'export WHO="$(id -u):$HOME:$(hostname):$(pwd)"\n'),
        ("18-env.sh", 'export ALL="$(env | sort | tr "\\n" " ")"\n'),
        ("zz-fine.sh", 'export FINE="$CONDA_PREFIX/share/fine"\n'),
    ]
    started = time.monotonic()
    activation = evaluate(sandbox, [package(scripts=hostile)])
    took = time.monotonic() - started
    assert took < 40, took
    verdicts = {v.name: v for v in activation.verdicts}
    # Static, and what it read is that nothing is there: the sandbox has no host files.
    assert verdicts["09-read.sh"].static and "can't open '/etc/shadow'" in activation.env["LEAK_FILE"]
    assert verdicts["zz-fine.sh"].static and set(activation.env) == {"FINE", "LEAK_FILE"}
    assert activation.env["FINE"] == f"{PREFIX}/share/fine"
    for name, _ in hostile[1:-1]:
        assert not verdicts[name].static and verdicts[name].reason, name
    assert "did not end" in verdicts["12-loop.sh"].reason
    assert "ended the shell" in verdicts["14-exit.sh"].reason
    assert "depends on the container" in verdicts["17-host.sh"].reason
    assert "host-secret-42" not in json.dumps(activation.as_json())


def test_what_the_sandbox_environment_holds(sandbox: Sandbox) -> None:
    # Static, so its value reached Env: only what the sandbox was given, nothing of the host.
    script = ("env.sh", 'export SEEN="$(env | grep -v -e ^SEEN= -e ^PWD= -e ^HOME= | sort | tr "\\n" " ")"\n')
    activation = evaluate(sandbox, [package(scripts=[script])])
    seen = activation.env["SEEN"].split()
    assert sorted(v.split("=")[0] for v in seen) == ["CONDA_PREFIX", "PATH", "SHLVL"], seen


def test_no_sandbox_falls_back_to_the_static_evaluator(caplog: pytest.LogCaptureFixture) -> None:
    box = Sandbox(bwrap="")
    with caplog.at_level("INFO", logger="condery.layers"):
        activation = asyncio.run(evaluate_activation([package("share/proj/proj.db", scripts=[real("proj")])],
                                                     PREFIX, box))
    assert activation.method == "static" and activation.env["PROJ_DATA"] == f"{PREFIX}/share/proj"
    assert "evaluated statically" in caplog.text and "bwrap is not installed" in caplog.text


# -- from the package to the record -----------------------------------------------------

def test_package_scripts_from_a_real_archive_and_through_the_record(tmp_path: Path) -> None:
    write_activation_packages(tmp_path)
    archive = tmp_path / "linux-64" / "condery-activate-1.0-0.tar.bz2"
    scripts = asyncio.run(read_package_scripts(archive))
    assert [n for n, _, _ in scripts.activate] == ["condery-activate.sh"]
    assert [n for n, _, _ in scripts.deactivate] == ["condery-activate.sh"]
    assert scripts.has_path("d", "share/condery-activate") and scripts.has_path("f", "share/condery-activate/data.txt")
    assert not scripts.has_path("f", "share/condery-activate") and not scripts.has_path("d", "share/nothing")
    # The text-mode placeholder becomes the environment's prefix.
    ((_, text),) = image_scripts([scripts], "/srv/env")
    assert 'CONDERY_ACTIVATE_BUILT_FOR="/srv/env/share"' in text
    entry = LayerEntry("k", DIGEST, DIGEST, 1, ("condery-activate",), scripts)
    assert LayerEntry.from_record("k", json.loads(json.dumps(entry.as_record()))) == entry
    damaged = entry.as_record()
    damaged["scripts"]["activate"] = [["../../etc/x.sh", "", ""]]
    assert LayerEntry.from_record("k", damaged) is None
    old = {**entry.as_record(), "schema": 2}
    assert LayerEntry.from_record("k", old) is None  # built again, and its scripts read


# -- into the image ---------------------------------------------------------------------

ACTIVATION = Activation({"PROJ_DATA": f"{PREFIX}/share/proj"}, (f"{PREFIX}/lib/jvm/bin",),
                        (Verdict("proj.sh", True), Verdict("r.sh", False, "runs R")), "bwrap")


def config_of(name: str, activation: Activation, base: dict | None, **meta) -> dict:
    config = load_config(None, environ={}, **({"meta_packages": {"m": meta}} if meta else {}))
    request = parse_name(name if not meta else f"{name}/m", config.meta_packages)
    created = datetime(2024, 1, 1, tzinfo=timezone.utc)
    settings = image_settings(config, request, [], created, "lock", None, activation=activation,
                              scratch=base is None)
    return json.loads(image_config(base, [], settings, oci_platform("linux-64"), []))["config"]


BASE = {"rootfs": {"type": "layers", "diff_ids": []},
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Entrypoint": ["/tini", "--"], "Cmd": ["sh"]}}


def test_config_env_and_the_activating_entrypoint() -> None:
    config = config_of("numpy", ACTIVATION, BASE)
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PROJ_DATA"] == f"{PREFIX}/share/proj"
    assert env["PATH"] == f"{PREFIX}/lib/jvm/bin:{PREFIX}/bin:/usr/bin:/bin"
    # The base's entrypoint runs after ours, and its Cmd stays.
    assert config["Entrypoint"] == ["/bin/sh", f"{PREFIX}/etc/condery/entrypoint.sh", "/tini", "--"]
    assert config["Cmd"] == ["sh"]
    static_only = Activation({"A": "1"}, (), (Verdict("a.sh", True),), "bwrap")
    assert config_of("numpy", static_only, BASE)["Entrypoint"] == ["/tini", "--"]
    # scratch has no /bin/sh, and this environment no bash: no entrypoint.
    assert "Entrypoint" not in config_of("numpy", ACTIVATION, None)


def test_a_meta_package_s_entrypoint_is_wrapped_and_its_env_wins() -> None:
    config = config_of("numpy", ACTIVATION, BASE, specs=["numpy"], entrypoint=["tini", "-g", "--"],
                       env={"PROJ_DATA": "/data/proj"})
    assert config["Entrypoint"] == ["/bin/sh", f"{PREFIX}/etc/condery/entrypoint.sh", "tini", "-g", "--"]
    assert "Cmd" not in config  # as a meta-package's entrypoint always did
    assert "PROJ_DATA=/data/proj" in config["Env"]


@pytest.mark.parametrize("activation", [ACTIVATION, Activation({"A": "1"}, (), (Verdict("a.sh", True),), "bwrap")])
def test_env_layer_files(activation: Activation, tmp_path: Path) -> None:
    from condery.layers.env_layer import build_env_layer

    blob = build_env_layer([], requested_specs=[], prefix=PREFIX, platform="linux-64",
                           created=datetime(2024, 1, 1, tzinfo=timezone.utc), out_path=tmp_path / "env.tar.gz",
                           command="condery", activation=activation)
    with tarfile.open(blob.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        report = json.loads(tar.extractfile(members["opt/conda/etc/condery/activation.json"]).read())
        entrypoint = members.get("opt/conda/etc/condery/entrypoint.sh")
        assert report == json.loads(json.dumps(activation.as_json()))
        assert (entrypoint is not None) == activation.needs_entrypoint
        if entrypoint is not None:
            assert entrypoint.mode == 0o755
            text = tar.extractfile(entrypoint).read().decode()
            assert text.startswith("#!/bin/sh\n") and text.rstrip().endswith('exec "$@"')


def test_the_entrypoint_execs_and_passes_status_and_pid(tmp_path: Path) -> None:
    """The script itself, under dash and busybox sh: the command replaces the shell."""
    import shutil
    import subprocess

    from condery.layers.env_layer import activate_script, entrypoint_script

    prefix = tmp_path / "env"
    (prefix / "etc/condery").mkdir(parents=True)
    (prefix / "etc/conda/activate.d").mkdir(parents=True)
    (prefix / "etc/condery/activate.sh").write_text(activate_script(str(prefix)))
    (prefix / "etc/conda/activate.d/a.sh").write_text('set -- clobbered; echo noise; export FROM_SCRIPT=yes\n')
    (prefix / "etc/condery/entrypoint.sh").write_text(entrypoint_script(str(prefix)))
    for shell in filter(None, (shutil.which("dash"), "/bin/busybox" if os.path.exists("/bin/busybox") else None)):
        argv = [shell, "sh"] if shell.endswith("busybox") else [shell]
        run = subprocess.run([*argv, str(prefix / "etc/condery/entrypoint.sh"), "sh", "-c",
                              'echo "$FROM_SCRIPT $1"; exit 7', "x", "arg one"],
                             check=False, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=30)
        assert run.returncode == 7 and run.stdout == "yes arg one\n" and "noise" in run.stderr, (shell, run)
        none = subprocess.run([*argv, str(prefix / "etc/condery/entrypoint.sh")], check=False, capture_output=True,
                              text=True,
                              env={"PATH": "/usr/bin:/bin"}, timeout=30)
        assert none.returncode == 127 and "no command" in none.stderr


async def test_an_old_package_without_paths_json_gives_its_scripts(tmp_path: Path) -> None:
    """info/files and info/has_prefix (packages of before 2017) name the scripts and their
    text placeholders, as paths.json does for the others."""
    from condery.layers.activation_scripts import PackageScripts, read_package_scripts
    from tests.fixtures.condapkg import PkgFile, write_conda_package

    placeholder = "/opt/anaconda1anaconda2anaconda3"
    script = f'export OLD_PKG_DATA="{placeholder}/share/old"\n'.encode()
    archive = write_conda_package(
        tmp_path, "oldpkg", "1.0", "h0",
        files=[PkgFile("etc/conda/activate.d/oldpkg.sh", script), PkgFile("share/old/data", b"d")],
        legacy_files=["etc/conda/activate.d/oldpkg.sh", "share/old/data"],
        has_prefix=f"{placeholder} text etc/conda/activate.d/oldpkg.sh\n", fmt="tar.bz2")
    scripts = await read_package_scripts(archive)
    assert scripts.activate == (("oldpkg.sh", script.decode(), placeholder),)
    assert PackageScripts.for_prefix(scripts.activate, "/opt/conda") == [
        ("oldpkg.sh", 'export OLD_PKG_DATA="/opt/conda/share/old"\n')]
