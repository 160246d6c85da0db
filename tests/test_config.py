"""Configuration: every rule of `load_config`, and `condery config`'s masked YAML.

Table-driven: each bad value must be refused with one line naming its key path, each
good one must come out typed as the rest of condery reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from condery.image.meta import DEFAULT_META_PACKAGES, ImageUser, MetaPackage
from condery.config.output import MASK
from condery.config import Config, ConfigError, StorageConfig, effective_yaml, load_config


def refused(**values: Any) -> list[str]:
    """The problem lines of a configuration file holding `values`."""
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={}, **values)
    return str(info.value).splitlines()


# (config values, the one expected problem line)
BAD: list[tuple[dict[str, Any], str]] = [
    # unknown keys, at every level
    ({"chanels": ["x"]}, "chanels: unknown key (did you mean channels?)"),
    ({"storage": {"backend": "filesystem", "pth": "x"}}, "storage.pth: unknown key (did you mean path?)"),
    ({"meta_packages": {"dev": {"specs": ["ipython"], "usr": "1"}}}, "meta_packages.dev.usr: unknown key (did you mean user?)"),
    # booleans are YAML's true/false only
    ({"allow_package_scripts": "yes"}, "allow_package_scripts: expected true or false, got 'yes'"),
    ({"allow_package_scripts": "ture"}, "allow_package_scripts: expected true or false, got 'ture'"),
    ({"allow_package_scripts": 1}, "allow_package_scripts: expected true or false, got 1"),
    ({"storage": {"backend": "s3", "bucket": "b", "redirect": "no"}}, "storage.redirect: expected true or false, got 'no'"),
    # integers are integers: no bools, strings or floats
    ({"port": True}, "port: expected an integer, got True"),
    ({"port": "8080"}, "port: expected an integer, got '8080'"),
    ({"layer_budget": 10.5}, "layer_budget: expected an integer, got 10.5"),
    ({"port": 70000}, "port: 70000 is out of range (at least 0 and at most 65535)"),
    ({"max_packages": 0}, "max_packages: 0 is out of range (at least 1)"),
    ({"latest_ttl": -1}, "latest_ttl: -1 is out of range (at least 0 seconds)"),
    ({"idle_timeout": 0}, "idle_timeout: 0 is out of range (at least 1 second)"),
    ({"log_format": "xml"}, "log_format: expected text or json, got 'xml'"),
    ({"layer_compression": "xz"}, "layer_compression: expected gzip or zstd, got 'xz'"),
    ({"layer_compression": "GZIP"}, "layer_compression: expected gzip or zstd, got 'GZIP'"),
    # sizes
    ({"max_package_unpacked_size": "8 parsecs"}, "max_package_unpacked_size: expected a size such as 8GiB or 500MB, got '8 parsecs'"),
    ({"max_package_unpacked_size": True}, "max_package_unpacked_size: expected a size such as 8GiB or 500MB, got True"),
    ({"max_package_unpacked_size": 0}, "max_package_unpacked_size: 0 is out of range (at least 1 byte)"),
    # lists and strings
    ({"channels": []}, "channels: expected a non-empty list, got []"),
    ({"channels": ["conda-forge", 3]}, "channels[1]: expected a non-empty string, got 3"),
    ({"channels": ["a", "a"]}, "channels: listed twice: a"),
    ({"channels": ["conda-forge", "::"]}, "channels[1]: '::' is not a channel (invalid channel name"),
    ({"channels": ["http://"]}, "channels[0]: 'http://' is not a channel (could not parse url)"),
    ({"host": 8080}, "host: expected a non-empty string, got 8080"),
    ({"prefix": "opt/conda"}, "prefix: expected an absolute path of [A-Za-z0-9._+-] parts, got 'opt/conda'"),
    ({"prefix": "/opt/../etc"}, "prefix: expected an absolute path of [A-Za-z0-9._+-] parts, got '/opt/../etc'"),
    # platforms: conda subdirs rattler knows, with a container platform
    ({"platforms": ["linux64"]}, "platforms[0]: 'linux64' is not a conda subdir (did you mean linux-64?)"),
    ({"platforms": ["linux-64", "osx-arm64"]}, "platforms[1]: conda subdir 'osx-arm64' has no container platform"),
    ({"platforms": ["noarch"]}, "platforms[0]: conda subdir 'noarch' has no container platform"),
    # storage: backends and their own keys
    ({"storage": {"backend": "nfs"}}, "storage.backend: expected filesystem or s3, got 'nfs'"),
    ({"storage": {"backend": "s3"}}, "storage.bucket: required for the s3 backend"),
    ({"storage": {"backend": "filesystem", "bucket": "b"}}, "storage.bucket: not a key of the filesystem backend"),
    ({"storage": {"backend": "s3", "bucket": "b", "path": "/x"}}, "storage.path: not a key of the s3 backend"),
    ({"storage": "filesystem"}, "storage: expected a mapping, got 'filesystem'"),
    # meta-packages: names are name components that no spec component can mean
    ({"meta_packages": {"Dev": ["ipython"]}}, "meta_packages.Dev: name 'Dev' is not a name component"),
    ({"meta_packages": {"my/dev": ["ipython"]}}, "meta_packages.my/dev: name 'my/dev' is not a name component"),
    ({"meta_packages": {"dev.gt.1": ["ipython"]}}, "meta_packages.dev.gt.1: name 'dev.gt.1' has the operator word 'gt'"),
    ({"meta_packages": {"dev": {"workdir": "/srv/dev"}}}, "meta_packages.dev.specs: required"),
    ({"meta_packages": {"dev": []}}, "meta_packages.dev.specs: expected a non-empty list, got []"),
    ({"meta_packages": {"dev": ["numpy >=>1"]}}, "meta_packages.dev.specs[0]: 'numpy >=>1' is not a conda match spec"),
    ({"meta_packages": {"dev": {"specs": ["x"], "cmd": "python -c 'x"}}}, "meta_packages.dev.cmd: cannot split"),
    ({"meta_packages": {"dev": {"specs": ["x"], "cmd": [1]}}}, "meta_packages.dev.cmd: expected a list of strings or a command line"),
    ({"meta_packages": {"dev": {"specs": ["x"], "env": {"DEBUG": True}}}}, "meta_packages.dev.env.DEBUG: expected a string (quote it), got True"),
    ({"meta_packages": {"dev": {"specs": ["x"], "env": {"A B": "1"}}}}, "meta_packages.dev.env: 'A B' is not an environment variable name"),
    ({"meta_packages": {"dev": {"specs": ["x"], "workdir": "home"}}}, "meta_packages.dev.workdir: expected an absolute path of"),
    ({"meta_packages": {"dev": {"specs": ["x"], "workdir": "/tmp"}}}, "meta_packages.dev.workdir: '/tmp' is a system directory"),
    ({"meta_packages": {"dev": {"specs": ["x"], "workdir": "/etc/x"}}}, "meta_packages.dev.workdir: '/etc/x' is a system directory"),
    ({"meta_packages": {"dev": {"specs": ["x"], "workdir": "/opt/conda/w"}}}, "meta_packages.dev.workdir: '/opt/conda/w' overlaps the prefix"),
    ({"meta_packages": {"dev": {"specs": ["x"], "labels": {"a=b": "1"}}}}, "meta_packages.dev.labels: 'a=b' is not a label key"),
    ({"meta_packages": {"dev": {"specs": ["x"], "entrypoint": []}}}, "meta_packages.dev.entrypoint: expected a list of strings"),
    # The old short form: a bare uid cannot give /etc/passwd a name or a home.
    ({"meta_packages": {"dev": {"specs": ["x"], "user": "1000"}}}, "meta_packages.dev.user: expected a mapping such as {name: jovyan, uid: 1000}"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"uid": 1000}}}}, "meta_packages.dev.user.name: required"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada"}}}}, "meta_packages.dev.user.uid: required"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 0}}}}, "meta_packages.dev.user.uid: 0 is out of range"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": True}}}}, "meta_packages.dev.user.uid: expected an integer"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "Ada:x", "uid": 1}}}}, "meta_packages.dev.user.name: expected a name"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 1, "gid": 0}}}}, "meta_packages.dev.user.group: gid 0 is the group root"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 1, "home": "/home/a:b"}}}}, "meta_packages.dev.user.home: expected an absolute path"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 1, "home": "/opt"}}}}, "meta_packages.dev.user.home: '/opt' is a system directory"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 1, "hom": "/h"}}}}, "meta_packages.dev.user.hom: unknown key (did you mean home?)"),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 1, "shell": "bash"}}}}, "meta_packages.dev.user.shell: expected an absolute path"),
    ({"meta_packages": ["dev"]}, "meta_packages: expected a mapping of name to settings"),
]


@pytest.mark.parametrize(("values", "expected"), BAD, ids=[line.split(":")[0] + "-" + str(i) for i, (_, line) in enumerate(BAD)])
def test_bad_values_are_refused_naming_the_key(values: dict[str, Any], expected: str) -> None:
    lines = refused(**values)
    assert len(lines) == 1, lines
    assert lines[0].startswith(expected), lines[0]


# (config values, attribute path, the typed value condery reads)
GOOD: list[tuple[dict[str, Any], str, Any]] = [
    ({"allow_package_scripts": True}, "allow_package_scripts", True),
    ({"port": 0}, "port", 0),
    ({"channels": "conda-forge, bioconda"}, "channels", ("conda-forge", "bioconda")),
    ({"platforms": ["linux-64", "linux-aarch64", "linux-ppc64le", "linux-s390x"]}, "platforms",
     ("linux-64", "linux-aarch64", "linux-ppc64le", "linux-s390x")),
    ({"max_package_unpacked_size": "8GiB"}, "max_package_unpacked_size", 8 << 30),
    ({"max_package_unpacked_size": "500MB"}, "max_package_unpacked_size", 500_000_000),
    ({"max_package_unpacked_size": 1024}, "max_package_unpacked_size", 1024),
    ({"package_cache": None}, "package_cache", None),
    ({"storage": {"backend": "s3", "bucket": "b", "redirect": True}}, "storage",
     StorageConfig(backend="s3", bucket="b", redirect=True)),
    # null means unset, whichever backend the key belongs to (`condery config` never prints it)
    ({"storage": {"backend": "filesystem", "path": "/srv/c", "bucket": None}}, "storage",
     StorageConfig(path="/srv/c")),
    ({"meta_packages": {"dev": ["ipython", "numpy >=1.20"]}}, "meta_packages.dev",
     MetaPackage(specs=("ipython", "numpy >=1.20"))),
    ({"meta_packages": {"dev": {"specs": ["ipython"], "cmd": "ipython --no-banner -c 'print(1)'",
                                "user": {"name": "ada", "uid": 1001}, "env": {"N": 3}, "workdir": "/w",
                                "entrypoint": "tini --", "labels": {"org.example.team": "ml"}}}}, "meta_packages.dev",
     MetaPackage(specs=("ipython",), user=ImageUser("ada", 1001, 1001, "ada", "/home/ada"), env={"N": "3"}, workdir="/w",
                 cmd=("ipython", "--no-banner", "-c", "print(1)"), entrypoint=("tini", "--"),
                 labels={"org.example.team": "ml"})),
    ({"meta_packages": {"dev": {"specs": ["x"], "user": {"name": "ada", "uid": 1001, "gid": 0, "group": "root",
                                                         "home": "/srv/ada", "shell": "/bin/sh"}}}},
     "meta_packages.dev.user", ImageUser("ada", 1001, 0, "root", "/srv/ada", "/bin/sh")),
    ({"meta_packages": {"dev": {"specs": ["ipython"], "cmd": ["a b", "c"]}}}, "meta_packages.dev.cmd", ("a b", "c")),
    ({"meta_packages": {"dev": ["ipython"]}}, "meta_packages.shell", DEFAULT_META_PACKAGES["shell"]),
    ({"meta_packages": {"py3.11": ["python 3.11.*"]}}, "meta_packages.py3.11.specs", ("python 3.11.*",)),
]


def _get(config: Config, path: str) -> Any:
    head, _, rest = path.partition(".")
    value = getattr(config, head)
    if head == "meta_packages" and rest:
        name = next(n for n in sorted(value, key=len, reverse=True) if rest == n or rest.startswith(n + "."))
        value, rest = value[name], rest[len(name) + 1:]
        return getattr(value, rest) if rest else value
    return value


@pytest.mark.parametrize(("values", "path", "expected"), GOOD)
def test_good_values_are_typed(values: dict[str, Any], path: str, expected: Any) -> None:
    assert _get(load_config(None, environ={}, **values), path) == expected


def test_every_problem_is_reported_at_once() -> None:
    lines = refused(port="80", allow_package_scripts="no", storage={"backend": "s3", "bucket": "b", "redirect": "no"})
    assert [line.split(":")[0] for line in lines] == ["port", "allow_package_scripts", "storage.redirect"]


@pytest.mark.parametrize(
    ("variable", "raw", "attribute", "expected"),
    [
        ("CONDERY_ALLOW_PACKAGE_SCRIPTS", "true", "allow_package_scripts", True),
        ("CONDERY_PORT", "9000", "port", 9000),
        ("CONDERY_CHANNELS", "[conda-forge, bioconda]", "channels", ("conda-forge", "bioconda")),
        ("CONDERY_CHANNELS", "conda-forge,bioconda", "channels", ("conda-forge", "bioconda")),
        ("CONDERY_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("CONDERY_BASE_IMAGE", "scratch", "base_image", "scratch"),
        ("CONDERY_STORAGE", "{backend: s3, bucket: b}", "storage", StorageConfig(backend="s3", bucket="b")),
    ],
)
def test_environment_values(variable: str, raw: str, attribute: str, expected: Any) -> None:
    assert getattr(load_config(None, environ={variable: raw}), attribute) == expected


def test_environment_problems_name_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"CONDERY_ALLOW_PACKAGE_SCRIPTS": "ture"})
    assert str(info.value) == "allow_package_scripts: expected true or false, got 'ture' (from CONDERY_ALLOW_PACKAGE_SCRIPTS)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: [1\n", "not valid YAML at line 2"),
        ("- a\n- b\n", "expected a mapping of keys at the top level, got list"),
        ("redirect: no\n", "redirect: unknown key"),
    ],
)
def test_file_problems(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "condery.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path, environ={})


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read configuration /nonexistent.yaml: No such file"):
        load_config("/nonexistent.yaml", environ={})


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "condery.yaml"
    path.write_text("# nothing yet\n")
    assert load_config(path, environ={}) == Config()


# -- condery config -------------------------------------------------------------------


def test_effective_yaml_reads_back_to_the_same_config(tmp_path: Path) -> None:
    config = load_config(
        None, environ={}, channels=["conda-forge", "https://example.org/channel"],
        platforms=["linux-64", "linux-aarch64"], storage={"backend": "s3", "bucket": "b", "endpoint_url": "http://h:9000"},
        meta_packages={"dev": {"specs": ["ipython"], "cmd": "ipython", "env": {"A": "1"}}},
        max_package_unpacked_size="1GiB",
    )
    path = tmp_path / "effective.yaml"
    path.write_text(effective_yaml(config, environ={}))
    assert load_config(path, environ={}) == config
    assert load_config(None, environ={}) == Config()  # and the defaults print and read back too
    path.write_text(effective_yaml(Config(), environ={}))
    assert load_config(path, environ={}) == Config()


@pytest.mark.parametrize(
    ("values", "environ", "secret", "masked_path"),
    [
        ({"channels": ["https://example.org/t/tk-5ecret/private"]}, {}, "tk-5ecret", "channels[0]"),
        ({"channels": ["https://me:pa55word@example.org/c"]}, {}, "pa55word", "channels[0]"),
        ({"storage": {"backend": "s3", "bucket": "b", "endpoint_url": "https://key:5ecret@s3.example.org"}}, {},
         "5ecret", "storage.endpoint_url"),
        ({"meta_packages": {"gh": {"specs": ["gh"], "env": {"GITHUB_TOKEN": "ghp_5ecret"}}}}, {},
         "ghp_5ecret", "meta_packages.gh.env.GITHUB_TOKEN"),
        ({"meta_packages": {"db": {"specs": ["psql"], "env": {"PGPASSWORD": "hunter2"}}}}, {},
         "hunter2", "meta_packages.db.env.PGPASSWORD"),
    ],
)
def test_effective_yaml_masks_secrets(values: dict[str, Any], environ: dict[str, str], secret: str, masked_path: str) -> None:
    text = effective_yaml(load_config(None, environ={}, **values), environ=environ)
    assert secret not in text
    assert f"# secrets masked or removed: {masked_path}" in text
    yaml.safe_load(text)  # still YAML


def test_effective_yaml_names_s3_credentials_without_their_values() -> None:
    config = load_config(None, environ={}, storage={"backend": "s3", "bucket": "b"})
    text = effective_yaml(config, environ={"AWS_ACCESS_KEY_ID": "AKIA5ECRET", "AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    assert "AKIA5ECRET" not in text and "s3cr3t" not in text
    assert f"# S3 credentials from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (values {MASK})" in text


def test_a_meta_package_called_auth_is_not_masked() -> None:
    config = load_config(None, environ={}, meta_packages={"auth": ["oauthlib"]})
    assert yaml.safe_load(effective_yaml(config, environ={}))["meta_packages"]["auth"] == {"specs": ["oauthlib"], "env": {}, "labels": {}}


def test_problems_never_quote_channel_credentials() -> None:
    [line] = refused(channels=["https://me:pa55word@/t/tk-5ecret/c"])
    assert "pa55word" not in line and "tk-5ecret" not in line and line.startswith("channels[0]: ")
