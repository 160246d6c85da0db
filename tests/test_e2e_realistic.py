"""End to end with real scientific software: numpy, scipy, pandas and matplotlib.

Their PyPI wheels, repackaged as conda-forge would ship them (tests/fixtures/
wheel_packages.py), are served by a real `condery serve`; skopeo pulls
`python/numpy/scipy/pandas/matplotlib` (hundreds of MB, thousands of files), umoci
unpacks it, and the image computes with all four inside bwrap. The glibc test base
provides what manylinux wheels expect from the system (libc, libm, libstdc++,
libgcc_s, libz): a static check of every ELF file in site-packages says so, beside the
script. Everything else ships in the wheels' `*.libs` directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.clients import bundle_env, run_in_rootfs
from tests.fixtures.elf import missing_libraries
from tests.fixtures.python_package import python_version
from tests.fixtures.wheel_packages import build_realistic_channel
from tests.test_e2e import condery, unpack

pytestmark = pytest.mark.e2e

IMAGE = "python/numpy/scipy/pandas/matplotlib"

COMPUTE = r"""
import json, platform, sys
import numpy as np
import pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from scipy import optimize

x = np.linalg.solve(np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([9.0, 8.0]))
root = optimize.brentq(lambda t: t ** 3 - 2.0, 0.0, 2.0)
frame = pd.DataFrame({"k": ["a", "b", "a", "b"], "v": [1, 2, 3, 4]})
sums = {key: int(value) for key, value in frame.groupby("k")["v"].sum().items()}
figure, axes = plt.subplots()
axes.plot(x)
figure.savefig("/tmp/plot.png")
with open("/tmp/plot.png", "rb") as handle:
    png = handle.read()
print(json.dumps({
    "python": platform.python_version(),
    "prefix": sys.prefix,
    "solve": [round(v, 9) for v in x],
    "cube_root_2": round(root, 6),
    "groupby": sums,
    "png": [png[:8].hex(), len(png)],
    "numpy_from": np.__file__,
}))
"""


@pytest.fixture(scope="module")
def realistic_channel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_realistic_channel(tmp_path_factory.mktemp("realistic-channel"))


def test_scientific_image_computes(realistic_channel: Path, base_layout: Path, tmp_path: Path) -> None:
    server = tmp_path / "server"
    server.mkdir()
    with condery(server, [str(realistic_channel)], f"oci:{base_layout}:bookworm") as registry:
        rootfs = unpack(registry, IMAGE, tmp_path)
    # Every extension module and bundled library of the wheels finds what it links, not
    # only the ones the script imports: the base provides what they take from the system
    # (libz among them: the bundled libgfortran, libpng and libtiff link it).
    site_packages = f"/opt/conda/lib/python{python_version().rsplit('.', 1)[0]}/site-packages"
    assert missing_libraries(rootfs, site_packages) == {}
    env = {**bundle_env(tmp_path / "bundle"), "MPLCONFIGDIR": "/tmp/matplotlib"}
    result = run_in_rootfs(rootfs, ["python", "-c", COMPUTE], env=env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["python"] == python_version()
    assert answer["prefix"] == "/opt/conda"
    assert answer["solve"] == [2.0, 3.0]
    assert answer["cube_root_2"] == 1.259921
    assert answer["groupby"] == {"a": 4, "b": 6}
    assert answer["png"][0] == "89504e470d0a1a0a" and answer["png"][1] > 1000
    assert answer["numpy_from"].startswith("/opt/conda/lib/python")
