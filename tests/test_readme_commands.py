"""The README's curl lines, run as written against a real `condery serve`.

Only the address changes (the README writes HOST, 127.0.0.1:8080 or registry:8080) and the
example build id (a build's id is a hash of its image key, so it is read from the POST's
Location). The channel holds small generated packages under the README's names (numpy,
scipy, python), so every line means what it says.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package
from tests.test_e2e import condery

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"
_ADDRESSES = re.compile(r"http://(HOST|127\.0\.0\.1:8080|registry:8080)")


def readme_curl_lines() -> list[str]:
    """The shell lines of the README's sh blocks that call curl, in order."""
    lines, in_sh = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_sh = line.strip() == "```sh"
        elif in_sh and "curl " in line and not line.lstrip().startswith("#"):
            lines.append(line)
    return lines


def run(line: str, base: str) -> str:
    result = subprocess.run(["bash", "-c", _ADDRESSES.sub(base, line)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (line, result.stderr)
    return result.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (.ci/install installs it)")
def test_the_readme_curl_lines_work_as_written(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    write_conda_package(channel, "python", "3.11.7", "h0_readme", files=[])
    write_conda_package(channel, "numpy", "1.26.4", "h0", files=[PkgFile("lib/numpy.txt", b"numpy")])
    write_conda_package(channel, "scipy", "1.11.4", "h0", files=[PkgFile("lib/scipy.txt", b"scipy")])
    index_channel(channel)
    lines = readme_curl_lines()
    assert len(lines) == 6, lines  # the images, compose, builds POST and GET lines and the wait loop
    images, compose, post, get, *wait = lines
    with condery(tmp_path, [str(channel)], "scratch") as registry:
        answer = json.loads(run(images, registry.url))
        assert answer["name"] == "numpy/scipy.gt.1.0"
        assert {p["name"] for p in answer["platforms"]["linux-64"]["packages"]} == {"numpy", "scipy"}

        assert json.loads(run(compose, registry.url)) == {"name": "numpy.ge.1.26/scipy.eq.1", "problems": []}

        head = run(post, registry.url)
        assert head.startswith("HTTP/1.1 202"), head
        location = re.search(r"^Location: (\S+)", head, re.MULTILINE).group(1)
        example_id = re.search(r"/api/v1/builds/(\w+)", get).group(1)
        status = json.loads(run(get.replace(example_id, location.rsplit("/", 1)[1]), registry.url))
        assert status["name"] == "numpy/python" and status["state"] in ("queued", "solving", "building", "done")

        run("\n".join(wait), registry.url)  # returns once the build is done or failed
        status = json.loads(run(f"curl -s {registry.url}{location}", ""))
        assert status["state"] == "done" and status["digest"].startswith("sha256:")
