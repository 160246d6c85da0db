"""The image's last layer: what belongs to this environment rather than to one package.

- `<prefix>/conda-meta/history`: conda's own format, so `conda list --revisions` and
  `conda install` later in a derived image see how the environment was made.
- `<prefix>/conda-meta/explicit.txt`: an `@EXPLICIT` lock (URL + sha256 per package) from
  which `conda create --file` or `micromamba create --file` rebuild the same environment.
- `<prefix>/etc/condery/activate.sh`: sets CONDA_PREFIX and PATH and sources the packages'
  `etc/conda/activate.d/*.sh` when a shell starts (those scripts read the container's
  environment). `/etc/profile.d/condery.sh` sources it for login shells; non-login shells
  get it through BASH_ENV/ENV in the image config. What the scripts export is also in the
  image config's Env where the build could evaluate them (layers/activation.py).
- `<prefix>/etc/condery/activation.json` (when packages have activate.d scripts): what
  the build found, each script static or why not; and `<prefix>/etc/condery/entrypoint.sh`
  when some script is not static: the image's entrypoint then (build/assembly.py), which
  activates and execs the command (docs/activation.md).
- With a user (a meta-package's `user`): `/etc/passwd` and `/etc/group` as the base left
  them plus that user and its group, and its home and working directory owned by it.
  containerd and runc create a missing working directory as root, and nothing can
  write in it then (podman chowns it and hides the problem); a uid without a passwd
  entry breaks `getpwuid` (`whoami`, ssh, some Python tools). The package layers stay
  root's, shared by every image, unless the environment is changeable (below).
- A changeable environment (a meta-package's `changeable`): everything of this layer under
  the prefix is the user's (`owner`), as its package layers are, and it holds the package
  manager's configuration (`.condarc`, `conda-meta/pinned`, `pip.conf`: build/changeable.py).

The layer depends only on the arguments, so it is reproducible like the package layers.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import rattler

from condery.common.redact import redact_url
from condery.layers import LayerBlob, PackageError
from condery.layers.activation import Activation
from condery.layers.compression import GZIP
from condery.layers.tarball import OwnedDir, TreeOwner, write_layer

# The prefix is pasted into shell scripts: keep it to characters that need no quoting.
_SHELL_SAFE_PREFIX = re.compile(r"^(/[A-Za-z0-9._+-]+)+$")
_ANACONDA_CLOUD = "https://conda.anaconda.org/"
# The package managers' configuration files at the prefix (a changeable environment's).
_CONFIG_FILES = (".condarc", "pip.conf")


def _check_prefix(prefix: str) -> str:
    if not _SHELL_SAFE_PREFIX.match(prefix) or any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"prefix {prefix!r} must be an absolute path of [A-Za-z0-9._+-] components")
    return prefix


def _dist(record: rattler.PackageRecord) -> str:
    return f"{record.name.normalized}-{record.version}-{record.build}"


def channel_name(channel_url: str) -> str:
    """How conda names a channel in history: "conda-forge" for anaconda.org, else its URL."""
    url = redact_url(channel_url).rstrip("/")
    if url.startswith(_ANACONDA_CLOUD):
        return url[len(_ANACONDA_CLOUD):]
    return url


def explicit_lock(records: Sequence[rattler.RepoDataRecord], platform: str) -> str:
    """conda's explicit environment file, dependencies before dependents."""
    lines = [f"# platform: {platform}", "@EXPLICIT"]
    # rattler returns plain PackageRecords (no URL); names are unique in a solve.
    by_name = {r.name.normalized: r for r in records}
    if len(by_name) != len(records):
        raise ValueError("explicit_lock needs records with unique names")
    for sorted_record in rattler.PackageRecord.sort_topologically(list(records)):
        record = by_name[sorted_record.name.normalized]
        if record.sha256 is None:
            raise PackageError(f"{_dist(record)}: the channel gives no sha256, so it cannot be locked")
        # Served without authentication: the URL must not carry the channel's credentials.
        lines.append(f"{redact_url(record.url)}#sha256:{record.sha256.hex()}")
    return "\n".join(lines) + "\n"


def history(records: Sequence[rattler.RepoDataRecord], requested_specs: Sequence[str], created: datetime,
            command: str) -> str:
    """One revision of conda-meta/history, as `conda create` writes it."""
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    stamp = created.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    added = sorted(f"+{channel_name(r.channel)}/{r.subdir}::{_dist(r)}" for r in records)
    one_line_command = " ".join(command.split())
    # conda reads the spec list back with ast.literal_eval, hence Python's list syntax.
    return "\n".join([
        f"==> {stamp} <==",
        f"# cmd: {one_line_command}",
        *added,
        f"# update specs: {[str(s) for s in requested_specs]!r}",
    ]) + "\n"


def activate_script(prefix: str) -> str:
    return f"""\
# Activation of the conda environment at {prefix} (written by condery).
# POSIX sh: sourced by bash (BASH_ENV, /etc/profile.d) and by dash/busybox sh (ENV).
export CONDA_PREFIX={prefix}
export CONDA_DEFAULT_ENV={prefix}
export CONDA_SHLVL=1
# Always, because /etc/profile of a login shell resets PATH.
case ":${{PATH:-}}:" in
    *:{prefix}/bin:*) ;;
    *) export PATH="{prefix}/bin${{PATH:+:$PATH}}" ;;
esac
# Once per process tree, as `conda activate` in a parent shell would: children inherit
# what the scripts export.
if [ "${{CONDERY_ACTIVATED:-}}" != "{prefix}" ]; then
    export CONDERY_ACTIVATED={prefix}
    # Package scripts test variables that may be unset without `${{VAR:-}}` (gdal's
    # "$GDAL_DRIVER_PATH"): under `bash -u -c` (nounset is on when BASH_ENV is read) the
    # first one would abort this file halfway. Off while they run, then as it was.
    case $- in *u*) _condery_nounset=1; set +u ;; *) _condery_nounset= ;; esac
    for _condery_script in {prefix}/etc/conda/activate.d/*.sh; do
        if [ -r "$_condery_script" ]; then
            . "$_condery_script"
        fi
    done
    if [ -n "$_condery_nounset" ]; then set -u; fi
    unset _condery_script _condery_nounset
fi
"""


def entrypoint_script(prefix: str) -> str:
    """The activating entrypoint: POSIX sh, for images whose activation scripts could not
    all be evaluated at build time. The scripts run in a function (a `set --` or `shift` in
    one cannot touch the command), with stdin from /dev/null and their output on stderr
    (the command's stdin and stdout are its own); `exec` then makes the command this
    process: PID 1 as it would be with no entrypoint, the signals and the exit status its
    own. No reaper is added (docs/activation.md: `--init`, or tini as the command)."""
    return f"""\
#!/bin/sh
# The entrypoint of this image (written by condery): some of the environment's activation
# scripts could not be evaluated when the image was built ({prefix}/etc/condery/activation.json
# says which and why), so the environment is activated here, then the command replaces
# this shell.
_condery_activate() {{
    . {prefix}/etc/condery/activate.sh
}}
_condery_activate </dev/null >&2
unset -f _condery_activate
if [ "$#" -eq 0 ]; then
    echo "condery entrypoint: no command given (this image has no Cmd: name one after the image)" >&2
    exit 127
fi
exec "$@"
"""


def profile_script(prefix: str) -> str:
    return f"""\
# Login shells: activate the conda environment at {prefix} (written by condery).
if [ -r {prefix}/etc/condery/activate.sh ]; then
    . {prefix}/etc/condery/activate.sh
fi
"""


@dataclass(frozen=True)
class Account:
    """The user an image runs as, resolved (assembly.image_account), and what the base has."""

    name: str
    uid: int
    gid: int
    group: str
    home: str
    shell: str
    workdir: str  # owned by the user too (often the home itself)
    base_passwd: str | None  # the base image's /etc/passwd text; None: it has none (scratch)
    base_group: str | None


# What a base without /etc/passwd (scratch, distroless static) gets besides the user.
_ROOT_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_ROOT_GROUP = "root:x:0:\n"


def _kept_lines(text: str, name: str, number: int) -> list[str]:
    """The lines of a passwd or group file without the entries of `name` or id `number`:
    ours replace them (Ubuntu's images have `ubuntu` at uid 1000), everything else stays
    as the base wrote it, comments and odd lines included."""
    kept = []
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and (fields[0] == name or fields[2] == str(number)):
            continue
        kept.append(line + "\n")
    return kept


def passwd_text(account: Account) -> str:
    base = _ROOT_PASSWD if account.base_passwd is None else account.base_passwd
    entry = f"{account.name}:x:{account.uid}:{account.gid}:{account.name}:{account.home}:{account.shell}\n"
    return "".join([*_kept_lines(base, account.name, account.uid), entry])


def group_text(account: Account) -> str:
    base = _ROOT_GROUP if account.base_group is None else account.base_group
    return "".join([*_kept_lines(base, account.group, account.gid), f"{account.group}:x:{account.gid}:\n"])


def build_env_layer(records: Sequence[rattler.RepoDataRecord], *, requested_specs: Sequence[str], prefix: str,
                    platform: str, created: datetime, out_path: Path, command: str,
                    account: Account | None = None, compression: str = GZIP,
                    activation: Activation | None = None,
                    variables: Mapping[str, str] | None = None, meta_files: Mapping[str, str] | None = None,
                    with_system: bool = True, owner: tuple[int, int] | None = None) -> LayerBlob:
    """Write the environment layer to `out_path` (blocking; small). `variables` are an
    environment file's: conda keeps them in conda-meta/state and sets them on activation.
    `meta_files` are more of conda-meta/ (the image read back as files: build/readback.py)
    and kernelspecs (share/jupyter/kernels/); nothing else, so that no package file is
    replaced. Without `with_system` (a kernel's environment under <prefix>/envs/), nothing
    outside the prefix: the profile script and the accounts are the image's own environment's.
    `owner` (uid, gid): the prefix's entries are theirs (a changeable environment)."""
    _check_prefix(prefix)
    out_path = Path(out_path)
    files = {
        "conda-meta/history": history(records, requested_specs, created, command),
        "conda-meta/explicit.txt": explicit_lock(records, platform),
        "etc/condery/activate.sh": activate_script(prefix),
    }
    if activation is not None and activation.verdicts:
        files["etc/condery/activation.json"] = json.dumps(activation.as_json(), indent=2, sort_keys=True) + "\n"
        if activation.needs_entrypoint:
            files["etc/condery/entrypoint.sh"] = entrypoint_script(prefix)
    files.update({rel: text for rel, text in (meta_files or {}).items()
                  if rel.startswith(("conda-meta/", "share/jupyter/kernels/")) or rel in _CONFIG_FILES})
    if variables:
        files["conda-meta/state"] = json.dumps({"env_vars": dict(sorted(variables.items()))}, indent=2) + "\n"
    system_files = {"etc/profile.d/condery.sh": profile_script(prefix)} if with_system else {}
    owned: list[OwnedDir] = []
    if account is not None:
        system_files.update({"etc/passwd": passwd_text(account), "etc/group": group_text(account)})
        for directory in dict.fromkeys((account.home, account.workdir)):  # once if they are one
            owned.append(OwnedDir(directory.strip("/"), account.uid, account.gid))
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".env-") as tmp:
        root = Path(tmp)
        env = root / prefix.strip("/")
        for rel, text in files.items():
            (env / rel).parent.mkdir(parents=True, exist_ok=True)
            (env / rel).write_text(text)
            if rel == "etc/condery/entrypoint.sh":
                (env / rel).chmod(0o755)
        for rel, text in system_files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        tree = None if owner is None else TreeOwner(prefix.strip("/"), *owner)
        return write_layer(root, "", out_path, owned_dirs=owned, compression=compression, owner=tree)
