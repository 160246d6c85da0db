"""build/changeable.py: who owns a changeable environment and its package managers' files."""

from __future__ import annotations

import rattler
import yaml
from rattler.package.build_string import BuildString

from condery.build.changeable import changeable_files, changeable_json, condarc, environment_owner, pinned_file
from condery.image.meta import DEFAULT_META_PACKAGES, JOVYAN, MetaPackage, combine_meta_packages


def record(name: str, version: str) -> rattler.RepoDataRecord:
    package = rattler.PackageRecord(name, version, BuildString("0"), 0, "linux-64")
    return rattler.RepoDataRecord(package, f"{name}-{version}-0.conda",
                                  f"https://conda.anaconda.org/conda-forge/linux-64/{name}-{version}-0.conda",
                                  "https://conda.anaconda.org/conda-forge/")


RECORDS = [record("python", "3.11.7"), record("numpy", "1.26.4"), record("conda", "24.1.0"), record("xz", "5.4.6")]


def test_jupyter_is_changeable_and_owned_by_jovyan() -> None:
    jupyter = DEFAULT_META_PACKAGES["jupyter"]
    assert environment_owner(jupyter) == (1000, 100)
    assert changeable_json(jupyter, "/opt/conda") == {"prefix": "/opt/conda", "owner": "1000:100",
                                                      "package_managers": ["conda", "pip"]}
    # Combined with another meta-package, the package managers join the specs.
    combined = combine_meta_packages({"jupyter": jupyter, "shell": DEFAULT_META_PACKAGES["shell"]})
    assert {"conda", "pip"} <= set(combined.specs) and combined.changeable
    assert "conda" not in DEFAULT_META_PACKAGES["shell"].specs


def test_off_or_without_a_user_nobody_but_root_owns_it() -> None:
    assert environment_owner(MetaPackage(specs=("x",), user=JOVYAN)) is None
    assert changeable_json(MetaPackage(specs=("x",), user=JOVYAN, changeable=False), "/opt/conda") is None
    rooted = MetaPackage(specs=("x",), changeable=True)  # root's image: root may change it anyway
    assert environment_owner(rooted) is None
    assert changeable_json(rooted, "/opt/conda")["owner"] == "0:0"


def test_condarc_names_channels_without_credentials_or_local_paths() -> None:
    text = condarc(["conda-forge", "https://alice:s3cret@private.example.org/t/tok-123/team",
                    "/srv/condery/channels/internal"])
    settings = yaml.safe_load(text)
    assert settings["channels"] == ["conda-forge", "https://private.example.org/team"]
    assert settings["channel_priority"] == "strict"
    for secret in ("s3cret", "tok-123", "alice", "/srv/condery"):
        assert secret not in text
    assert "internal" in text  # named in a comment: left out, on the registry's disk
    assert yaml.safe_load(condarc(["/srv/only-local"]))["channels"] == []


def test_pins_keep_python_and_the_names_versioned_specs() -> None:
    text = pinned_file(RECORDS, ["numpy >1.0", "xz", "conda", "pip"])
    assert text == "numpy >1.0\npython 3.11.*\n"
    # A name that pins python itself keeps its own pin, not the major.minor.
    assert pinned_file(RECORDS, ["python ==3.11.7"]) == "python ==3.11.7\n"
    assert pinned_file([record("xz", "5.4.6")], ["xz"]) == ""  # no python: nothing to keep


def test_files_are_the_three_package_manager_files() -> None:
    files = changeable_files(["conda-forge"], RECORDS, ["numpy >1.0"], "https://user:pw@pypi.example.org/simple")
    assert set(files) == {".condarc", "conda-meta/pinned", "pip.conf"}
    assert "index-url = https://pypi.example.org/simple" in files["pip.conf"]
    assert "pw" not in files["pip.conf"]
