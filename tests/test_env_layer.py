"""The environment layer: history, explicit lock, activation that really runs in a shell."""

from __future__ import annotations

import ast
import shutil
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
import rattler

from condery.layers.env_layer import Account, build_env_layer, channel_name, explicit_lock
from tests.fixtures.condapkg import PkgFile, index_channel, write_conda_package

ANACONDA = Path("/work/shared/fixtures/anaconda-main-2020")
CREATED = datetime(2024, 6, 1, 23, 59, 59, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[rattler.RepoDataRecord]:
    ch = tmp_path_factory.mktemp("real")
    for rel in ("linux-64/xz-5.2.5-h7b6447c_0.conda", "noarch/tqdm-4.54.1-pyhd3eb1b0_0.conda"):
        (ch / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ANACONDA / rel, ch / rel)
    # Metadata-only stand-ins for the two packages the fixtures lack.
    write_conda_package(ch, "libgcc-ng", "9.1.0", "hdf63c60_0", license="metadata-only stand-in")
    write_conda_package(ch, "python", "3.9.1", "hdb3f193_2", depends=["libgcc-ng >=7.3.0"],
                        license="metadata-only stand-in", files=[PkgFile("bin/python3.9", b"")])
    index_channel(ch)
    import asyncio

    return asyncio.run(rattler.solve([rattler.Channel(ch.as_uri())], ["tqdm", "xz"], platforms=["linux-64", "noarch"]))


def build(records, out: Path, prefix: str = "/opt/conda", **kw):
    args = dict(requested_specs=["tqdm", "xz"], prefix=prefix, platform="linux-64", created=CREATED,
                command="condery build tqdm/xz")
    args.update(kw)
    return build_env_layer(records, out_path=out, **args)


def read_members(path: Path) -> dict[str, bytes | None]:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()}


def test_layer_contents_and_determinism(records, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build(records, tmp_path / "a" / "env.tgz")
    b = build(list(reversed(records)), tmp_path / "b" / "env.tgz")
    assert a.digest == b.digest and a.diff_id == b.diff_id
    assert build(records, tmp_path / "c.tgz", created=datetime(2024, 6, 2)).digest != a.digest
    assert list((tmp_path / "a").iterdir()) == [a.path]  # no temporary tree left

    members = read_members(a.path)
    assert sorted(k for k, v in members.items() if v is not None) == [
        "etc/profile.d/condery.sh",
        "opt/conda/conda-meta/explicit.txt",
        "opt/conda/conda-meta/history",
        "opt/conda/etc/condery/activate.sh",
    ]
    history = members["opt/conda/conda-meta/history"].decode().splitlines()
    assert history[0] == "==> 2024-06-01 23:59:59 <=="
    assert history[1] == "# cmd: condery build tqdm/xz"
    channel = channel_name(records[0].channel)
    assert sorted(history[2:-1]) == history[2:-1]
    assert f"+{channel}/linux-64::xz-5.2.5-h7b6447c_0" in history
    assert f"+{channel}/noarch::tqdm-4.54.1-pyhd3eb1b0_0" in history
    assert len(history) == 2 + len(records) + 1
    assert history[-1].startswith("# update specs: ")
    assert ast.literal_eval(history[-1].split(":", 1)[1].strip()) == ["tqdm", "xz"]


def test_explicit_lock(records) -> None:
    lock = explicit_lock(records, "linux-64").splitlines()
    assert lock[:2] == ["# platform: linux-64", "@EXPLICIT"]
    by_url = {r.url: r for r in records}
    urls = []
    for line in lock[2:]:
        url, _, digest = line.partition("#sha256:")
        assert digest == by_url[url].sha256.hex()
        urls.append(url.rsplit("/", 1)[1])
    assert len(urls) == len(records)
    # Dependencies come first.
    assert urls.index("libgcc-ng-9.1.0-hdf63c60_0.tar.bz2") < urls.index("xz-5.2.5-h7b6447c_0.conda")
    assert urls.index("python-3.9.1-hdb3f193_2.tar.bz2") < urls.index("tqdm-4.54.1-pyhd3eb1b0_0.conda")
    assert explicit_lock(list(reversed(records)), "linux-64") == "\n".join(lock) + "\n"


def test_channel_name() -> None:
    assert channel_name("https://conda.anaconda.org/conda-forge/") == "conda-forge"
    assert channel_name("https://example.org/channels/mine/") == "https://example.org/channels/mine"


@pytest.mark.parametrize("prefix", ["opt/conda", "/opt/con da", "/opt/$(x)", "/opt/../etc", "/"])
def test_unsafe_prefix_is_refused(records, tmp_path: Path, prefix: str) -> None:
    with pytest.raises(ValueError):
        build(records, tmp_path / "env.tgz", prefix=prefix)


def test_activation_runs_in_shells(records, tmp_path: Path) -> None:
    """Unpack the layer with its prefix at a real path and start shells the way images do."""
    prefix = tmp_path / "env"
    blob = build(records, tmp_path / "env.tgz", prefix=str(prefix))
    unpacked = tmp_path / "rootfs"
    unpacked.mkdir()
    subprocess.run(["tar", "-xzf", str(blob.path), "-C", str(unpacked)], check=True)
    shutil.move(unpacked / str(prefix).lstrip("/"), prefix)
    activate_d = prefix / "etc" / "conda" / "activate.d"
    activate_d.mkdir(parents=True)
    # A package's activation script; it counts how often it runs.
    (activate_d / "pkg.sh").write_text('export PKG_ACTIVATED="${PKG_ACTIVATED:-}x"\n')
    probe = 'echo "$CONDA_PREFIX|${PATH%%:*}|$PKG_ACTIVATED"'
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    # Non-login bash: BASH_ENV; nested shells inherit and do not re-run activate.d.
    out = subprocess.run(["bash", "-c", probe + "; bash -c '" + probe.replace("'", "") + "'"],
                         env={**env, "BASH_ENV": str(prefix / "etc/condery/activate.sh")},
                         check=True, capture_output=True, text=True).stdout.splitlines()
    assert out == [f"{prefix}|{prefix}/bin|x"] * 2
    # `bash -u -c`: nounset is on while BASH_ENV is read; a script's unguarded test of an
    # unset variable (gdal's) must not stop the activation, and -u stays on for the command.
    (activate_d / "pkg.sh").write_text('if [ -n "$PKG_UNSET" ]; then :; fi\n'
                                       'export PKG_ACTIVATED="${PKG_ACTIVATED:-}x"\n')
    result = subprocess.run(["bash", "-u", "-c", probe + '; case $- in *u*) echo nounset;; esac'],
                            env={**env, "BASH_ENV": str(prefix / "etc/condery/activate.sh")},
                            check=True, capture_output=True, text=True)
    assert result.stdout.splitlines() == [f"{prefix}|{prefix}/bin|x", "nounset"] and not result.stderr
    # Login shells source /etc/profile.d/condery.sh after /etc/profile reset PATH.
    profile = unpacked / "etc" / "profile.d" / "condery.sh"
    out = subprocess.run(["sh", "-c", f"PATH=/usr/bin:/bin; . {profile}; {probe}"],
                         env={**env, "CONDERY_ACTIVATED": str(prefix), "PKG_ACTIVATED": "x"},
                         check=True, capture_output=True, text=True).stdout
    assert out == f"{prefix}|{prefix}/bin|x\n"
    # Interactive POSIX sh (dash, busybox) reads ENV.
    out = subprocess.run(["sh", "-i", "-c", probe], env={**env, "ENV": str(prefix / "etc/condery/activate.sh")},
                         check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    assert out == f"{prefix}|{prefix}/bin|x\n"


BASE_PASSWD = ("root:x:0:0:root:/root:/bin/bash\n# a comment stays\nubuntu:x:1000:1000:Ubuntu:/home/ubuntu:/bin/bash\n"
               "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")  # no final newline
BASE_GROUP = "root:x:0:\nusers:x:100:\nubuntu:x:1000:\n"


def jovyan(**overrides) -> Account:
    values = dict(name="jovyan", uid=1000, gid=100, group="users", home="/home/jovyan", shell="/opt/conda/bin/bash",
                  workdir="/home/jovyan/work", base_passwd=BASE_PASSWD, base_group=BASE_GROUP)
    values.update(overrides)
    return Account(**values)


def test_user_accounts_and_owned_home(records, tmp_path: Path) -> None:
    layer = build(records, tmp_path / "env.tgz", account=jovyan())
    assert build(records, tmp_path / "again.tgz", account=jovyan()).digest == layer.digest
    with tarfile.open(layer.path, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        passwd = tar.extractfile("etc/passwd").read().decode()
        group = tar.extractfile("etc/group").read().decode()
    # The base's entries stay as written; the one holding our uid (Ubuntu's `ubuntu`) gives way.
    assert passwd.splitlines() == [
        "root:x:0:0:root:/root:/bin/bash", "# a comment stays", "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
        "jovyan:x:1000:100:jovyan:/home/jovyan:/opt/conda/bin/bash",
    ]
    assert group.splitlines() == ["root:x:0:", "ubuntu:x:1000:", "users:x:100:"]
    for directory in ("home/jovyan", "home/jovyan/work"):
        member = members[directory]
        assert member.isdir() and (member.uid, member.gid, member.mode) == (1000, 100, 0o755), directory
    # Their parents are the base's business (a layer entry would reset /home's owner and mode).
    assert "home" not in members
    assert all((m.uid, m.gid) == (0, 0) for name, m in members.items() if not name.startswith("home/"))
    assert (members["etc/passwd"].mode, members["etc/group"].mode) == (0o644, 0o644)


def test_user_on_scratch_gets_root_too(records, tmp_path: Path) -> None:
    account = jovyan(base_passwd=None, base_group=None, workdir="/home/jovyan", gid=1000, group="jovyan")
    members = read_members(build(records, tmp_path / "env.tgz", account=account).path)
    assert members["etc/passwd"].decode().splitlines() == [
        "root:x:0:0:root:/root:/bin/sh", "jovyan:x:1000:1000:jovyan:/home/jovyan:/opt/conda/bin/bash"]
    assert members["etc/group"].decode().splitlines() == ["root:x:0:", "jovyan:x:1000:"]


def test_no_user_no_accounts(records, tmp_path: Path) -> None:
    members = read_members(build(records, tmp_path / "env.tgz").path)
    assert "etc/passwd" not in members and not any(name.startswith("home") for name in members)
