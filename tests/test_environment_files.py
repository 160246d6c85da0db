"""Environment files read strictly into one normalized environment (image/environment.py):
the id ignores spelling, every problem names its line, hostile files are refused cheaply."""

from __future__ import annotations

import time

import pytest

from condery.image.environment import (
    MAX_FILE_BYTES,
    Environment,
    EnvironmentFileError,
    read_environment,
    solve_channels,
)
from condery.image.names import environment_request, parse_environment_name
from condery.oci.errors import NameInvalid

FILE = """\
# the team's environment
name: team-a
channels:
  - conda-forge
  - nodefaults
dependencies:
  - python=3.11
  - numpy>=1.26
  - conda-forge::scipy
  - pip:
      - Requests >= 2
variables:
  PROJ_NETWORK: "ON"
"""

SAME_FILE_OTHER_SPELLING = """\
variables: {PROJ_NETWORK: "ON"}
dependencies:
- {pip: [requests>=2]}
- conda-forge::scipy
- numpy >=1.26       # the same spec, spaced
- python 3.11.*
channels: [conda-forge]
name: team-a
"""

SHA = "a" * 64


def test_spelling_comments_and_order_do_not_change_the_id() -> None:
    first, second = read_environment(FILE), read_environment(SAME_FILE_OTHER_SPELLING)
    assert first == second and first.id == second.id
    assert first.specs == ("conda-forge::scipy", "numpy >=1.26", "python 3.11.*")
    assert first.pip == ("requests>=2",)
    assert dict(first.variables) == {"PROJ_NETWORK": "ON"}
    assert first.channels == ("conda-forge",)
    assert read_environment(FILE.replace("numpy>=1.26", "numpy>=1.27")).id != first.id


def test_stored_form_reads_back_to_the_same_environment() -> None:
    for text in (FILE, f"@EXPLICIT\nhttps://conda.anaconda.org/conda-forge/linux-64/xz-5.2.5-h_0.conda#sha256:{SHA}\n"):
        environment = read_environment(text)
        assert Environment.from_json(environment.as_json()) == environment


def test_explicit_lock_and_conda_lock_are_frozen_and_name_only_their_packages() -> None:
    explicit = read_environment(
        "# platform: linux-64\n@EXPLICIT\n"
        f"https://conda.anaconda.org/conda-forge/linux-64/xz-5.2.5-h_0.conda#{SHA}\n"
        f"https://user:secret@conda.anaconda.org/conda-forge/noarch/tzdata-2020a-h_0.conda#{'b' * 32}\n")
    assert explicit.frozen and set(explicit.locked) == {"linux-64"}
    assert all("secret" not in p.url for p in explicit.locked["linux-64"])  # credentials never stored
    conda_lock = read_environment(f"""\
version: 1
metadata: {{channels: [{{url: conda-forge}}], platforms: [linux-64]}}
package:
- name: xz
  version: 5.2.5
  manager: conda
  platform: linux-64
  dependencies: {{}}
  url: https://conda.anaconda.org/conda-forge/linux-64/xz-5.2.5-h_0.conda
  hash: {{sha256: {SHA}}}
  category: main
  optional: false
""")
    assert conda_lock.frozen and conda_lock.locked["linux-64"][0].sha256 == SHA
    request = environment_request(f"env/{conda_lock.id}", conda_lock)
    assert request.specs == ("xz ==5.2.5 h_0",) and request.environment is conda_lock


@pytest.mark.parametrize(("text", "line", "words"), [
    ("name: x\nfoo: 1\ndependencies: [python]\n", 2, "unknown key 'foo'"),
    ("dependencies:\n  - python\n  - 'numpy >>> 1'\n", 3, "not a conda spec"),
    ("dependencies:\n  - python\n  - pip:\n    - --index-url https://evil.example/simple\n", 4, "--index-url"),
    ("dependencies:\n  - python\n  - pip:\n    - foo @ https://evil.example/foo.whl\n", 4, "names a URL"),
    ("dependencies:\n  - numpy\n  - pip: [tqdm]\n", None, "need python"),
    ("dependencies: [python]\nvariables:\n  PATH: /x\n", 3, "activation"),
    ("a: &x [1, 2]\nb: *x\n", 2, "aliases"),
    ("dependencies: [python\n", 2, "not valid YAML"),
    ("- just\n- a list\n", 1, "expected an environment.yml"),
    ("@EXPLICIT\nhttps://host/chan/linux-64/xz-5.2.5-h_0.conda\n", 2, "without its hash"),
    ("@EXPLICIT\nhttps://host/chan/linux-64/../../etc/passwd#" + SHA + "\n", 2, "expected <channel>/<subdir>"),
])
def test_bad_files_name_the_line_and_the_problem(text: str, line: int | None, words: str) -> None:
    with pytest.raises(EnvironmentFileError) as caught:
        read_environment(text)
    assert words in str(caught.value)
    assert caught.value.line == line


def test_hostile_files_are_refused_fast() -> None:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(9))
    started = time.monotonic()
    for text, words in [
        (laughs, "aliases"),
        ("x:\n" + "".join("  " * i + "- \n" for i in range(1, 200)), "nested deeper"),
        ("[" * 50_000, "nested deeper"),
        (b"dependencies: [python]\n" + b"#" * MAX_FILE_BYTES, "larger than"),
        (b"dependencies: [\xff]\n", "not UTF-8"),
    ]:
        with pytest.raises(EnvironmentFileError, match=words):
            read_environment(text)
    assert time.monotonic() - started < 5


def test_channels_must_be_served_and_keep_the_file_order() -> None:
    configured = ["conda-forge", "/srv/channels/internal"]
    environment = read_environment("channels: [internal, conda-forge]\ndependencies: [internal::tool, numpy]\n")
    channels, specs = solve_channels(environment, configured)
    assert channels == ("/srv/channels/internal", "conda-forge")  # priority as the file says
    assert specs == ("file:///srv/channels/internal/::tool", "numpy")
    assert solve_channels(read_environment("dependencies: [numpy]\n"), configured)[0] == tuple(configured)
    with pytest.raises(EnvironmentFileError, match="'bioconda' is not served"):
        solve_channels(read_environment("channels: [bioconda]\ndependencies: [numpy]\n"), configured)
    locked = read_environment(f"@EXPLICIT\nhttps://mirror.example/other/linux-64/xz-5.2.5-h_0.conda#sha256:{SHA}\n")
    with pytest.raises(EnvironmentFileError, match="not in a channel this registry serves"):
        solve_channels(locked, configured)


def test_environment_names() -> None:
    assert parse_environment_name("env/" + "0" * 32) == ("env", "0" * 32)
    assert parse_environment_name("envs/team-a") == ("envs", "team-a")
    assert parse_environment_name("numpy/scipy") is None and parse_environment_name("env") is None
    assert parse_environment_name("env/numpy/scipy") is None  # three components: specs, as before
    with pytest.raises(NameInvalid, match="hex digits"):
        parse_environment_name("env/numpy")


def test_pushes_per_client_are_bounded() -> None:
    from condery.build.environments import PushBudget
    from condery.oci.errors import TooManyRequests

    budget = PushBudget(per_minute=3, clients=2)
    for second in range(3):
        budget.take("a", now=float(second))
    with pytest.raises(TooManyRequests):
        budget.take("a", now=3.0)
    budget.take("b", now=3.0)  # another client is not held back
    budget.take("a", now=61.5)  # the first push is a minute old
    budget.take("c", now=62.0)
    assert len(budget._recent) == 2  # the memory of clients is bounded too
