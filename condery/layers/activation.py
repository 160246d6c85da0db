"""The variables an image's activation scripts export, computed at build time without
running a package's code on the build host outside a sandbox.

Packages set variables in `etc/conda/activate.d/*.sh` (PROJ_DATA, GDAL_DATA, JAVA_HOME,
...). A shell that sources the environment's activation sees them; an exec-form command,
`podman exec`, a Jupyter kernel or a Dockerfile `RUN` sees only the image config's `Env`.
This module computes what the scripts export so that it can go into `Env`, and says
which scripts it could not evaluate (those are left to an activating entrypoint:
env_layer.py, build/assembly.py). docs/activation.md says what each process gets.

Two evaluators, one answer type (`Activation`):

- `bwrap` (bubblewrap, preferred): the scripts are sourced, in conda's order (sorted by
  file name), by a static busybox (`/bin/busybox`, Debian's busybox-static) in a sandbox
  with no network (`--unshare-all`), no host files (an empty root holding only busybox,
  the scripts, empty stand-ins for the image paths the scripts name, tripwires at every
  program of the image's `bin/`), a read-only root, a small /tmp, no capabilities, an
  unprivileged uid, a minimal environment (CONDA_PREFIX, PATH, HOME=/nonexistent), a
  wall-clock and CPU time limit and bounded output. After each script the sandbox prints
  the environment (NUL-separated). It runs twice, as two different users with two homes
  and host names: a variable whose value differs between the runs depends on the
  container it runs in and is not static.
- `static` (the fallback where bwrap or a static busybox is missing or does not work):
  activation_static.py evaluates a safe subset of POSIX sh in Python.

A script is *static* when it ran to its end with status 0, wrote nothing to stderr, ran
no program of the image and set the same values in both runs. Any other script (failed,
timed out, exited the shell, printed too much, needed a command busybox lacks) is
reported with the reason, and the evaluation is repeated without it, so the others'
variables still reach `Env`. The difference between the first and the last environment
of the remaining scripts is the static `Env`, without the save-and-restore bookkeeping
of activation scripts (`_CONDA_SET_*`, `_CONDA_BACKUP_*`, `CONDA_BACKUP_*`, `*_BACKUP`)
and without variables the shell or the image owns (HOME, PWD, CONDA_PREFIX, ...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from condery.common.children import spawn, stop
from condery.layers.activation_scripts import ACTIVATE_DIR, DEACTIVATE_DIR, PackageScripts
from condery.layers.activation_static import run_static
from condery.observability.logs import event

log = logging.getLogger("condery.layers")

BUSYBOX = "/bin/busybox"
SANDBOX_PATH_TAIL = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUN_TIMEOUT = 5.0  # seconds of one sandbox run (all scripts)
BUDGET = 30.0  # seconds for one image's evaluation, reruns included
MAX_OUTPUT = 1024 * 1024  # bytes a sandbox run may print
MAX_VALUE = 64 * 1024  # a longer value is not put in a config
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables of the shell, the user or the image itself: never from a script into Env.
_OWNED = frozenset({
    "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "_", "IFS", "PS1", "PS2", "PS4",
    "OPTIND", "LINENO", "PPID", "ENV", "BASH_ENV", "TERM", "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "CONDA_SHLVL",
    "CONDA_EXE", "CONDERY_ACTIVATED", "LANG",
})
_BOOKKEEPING = re.compile(r"^(_CONDA_SET_|_CONDA_BACKUP_|CONDA_BACKUP_)|_BACKUP$")
# A path after $CONDA_PREFIX in a script: the files and directories scripts test.
_PREFIX_PATH = re.compile(r"\$\{?CONDA_PREFIX(?::?-\})?\}?((?:/[A-Za-z0-9._+@%,=-]+)+)")


@dataclass(frozen=True)
class Verdict:
    """One activate.d script: static, or why not."""

    name: str
    static: bool
    reason: str | None = None


@dataclass(frozen=True)
class Activation:
    env: Mapping[str, str]  # for the image config's Env
    path_prepend: tuple[str, ...]  # PATH entries the scripts put first
    verdicts: tuple[Verdict, ...]
    method: str  # "bwrap", "static" or "none" (no scripts)

    @property
    def not_static(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if not v.static)

    @property
    def needs_entrypoint(self) -> bool:
        return bool(self.not_static)

    def as_json(self) -> dict:
        """What the image holds as etc/condery/activation.json (env_layer.py)."""
        return {
            "method": self.method,
            "env": dict(sorted(self.env.items())),
            "path_prepend": list(self.path_prepend),
            "scripts": [{"name": v.name, "static": v.static, **({"reason": v.reason} if v.reason else {})}
                        for v in self.verdicts],
        }


NO_SCRIPTS = Activation({}, (), (), "none")


def image_scripts(packages: Sequence[PackageScripts], prefix: str, kind: str = "activate") -> list[tuple[str, str]]:
    """The environment's activate.d (or deactivate.d) scripts in the order conda sources
    them (sorted by file name; a name two packages ship is the later package's file, as in
    the merged layers), placeholders replaced by the prefix."""
    by_name: dict[str, str] = {}
    for package in packages:
        by_name.update(PackageScripts.for_prefix(getattr(package, kind), prefix))
    return sorted(by_name.items())


def probes(scripts: Sequence[tuple[str, str]], packages: Sequence[PackageScripts]) -> list[tuple[str, str]]:
    """(kind, path relative to the prefix) of the image's files ("f") and directories ("d")
    that the scripts name after $CONDA_PREFIX: the sandbox holds empty stand-ins for them."""
    candidates: set[str] = set()
    for _, text in scripts:
        for match in _PREFIX_PATH.finditer(text):
            rel = match.group(1).strip("/")
            while rel:
                candidates.add(rel)
                rel = rel.rpartition("/")[0]
    found = []
    for rel in sorted(candidates):
        if ".." in rel.split("/"):
            continue
        for kind in ("d", "f"):
            if any(p.has_path(kind, rel) for p in packages):
                found.append((kind, rel))
                break
    return found


def programs(packages: Sequence[PackageScripts]) -> list[str]:
    return sorted({name for p in packages for name in p.programs})


# ---------------------------------------------------------------------------------------
# The sandbox

_DRIVER = r"""
ulimit -t 10 2>/dev/null
ulimit -f 2048 2>/dev/null
ulimit -v 262144 2>/dev/null
printf 'start\0'; env -0; printf 'end\0'
for _condery_name in $(cat /.condery/names); do
    printf 'begin\0%s\0' "$_condery_name"
    . "$CONDA_PREFIX/etc/conda/activate.d/$_condery_name" </dev/null >/dev/null 2>/tmp/.condery-err
    _condery_status=$?
    set +eu
    printf 'status\0%s\0' "$_condery_status"
    printf 'stderr\0'; head -c 2048 /tmp/.condery-err | tr -d '\000'; printf '\0'
    printf 'calls\0'; if [ -f /tmp/.condery-calls ]; then head -c 2048 /tmp/.condery-calls | tr -d '\000'; fi; printf '\0'
    rm -f /tmp/.condery-calls /tmp/.condery-err
    printf 'env\0'; env -0; printf 'end\0'
done
printf 'done\0'
"""

_TRIPWIRE = """#!/bin/busybox sh
printf '%s\\n' "$0" >> /tmp/.condery-calls
exit 127
"""


@dataclass
class _ScriptRun:
    name: str
    status: int | None = None
    stderr: str = ""
    calls: str = ""
    env: dict[str, str] | None = None


@dataclass
class _Run:
    start: dict[str, str] | None = None
    scripts: list[_ScriptRun] = field(default_factory=list)
    done: bool = False
    problem: str | None = None  # why the run did not reach its end


def _parse(output: bytes) -> _Run:
    run = _Run()
    tokens = output.split(b"\0")
    i = 0

    def env_until_end() -> dict[str, str] | None:
        nonlocal i
        env: dict[str, str] = {}
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if token == b"end":
                return env
            key, sep, value = token.decode("utf-8", errors="replace").partition("=")
            if sep:
                env[key] = value
        return None  # cut short

    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == b"start":
            run.start = env_until_end()
        elif token == b"begin" and i < len(tokens):
            run.scripts.append(_ScriptRun(tokens[i].decode("utf-8", errors="replace")))
            i += 1
        elif run.scripts and i < len(tokens) and token in (b"status", b"stderr", b"calls"):
            value = tokens[i].decode("utf-8", errors="replace")
            i += 1
            current = run.scripts[-1]
            if token == b"status":
                current.status = int(value) if value.isdigit() else 255
            elif token == b"stderr":
                current.stderr = value
            else:
                current.calls = value
        elif token == b"env" and run.scripts:
            run.scripts[-1].env = env_until_end()
        elif token == b"done":
            run.done = True
            break
    return run


@dataclass(frozen=True)
class _Variant:
    """What differs between the two runs: a value that follows these is not static."""

    uid: int
    home: str
    hostname: str
    cwd: str


_VARIANTS = (_Variant(65534, "/nonexistent", "condery-sandbox-a", "/"),
             _Variant(1000, "/nonexistent/b", "condery-sandbox-b", "/tmp"))


class Sandbox:
    """bwrap and a static busybox, checked once per process (`usable`)."""

    def __init__(self, bwrap: str | None = None, busybox: str = BUSYBOX) -> None:
        self.bwrap = bwrap if bwrap is not None else shutil.which("bwrap")
        self.busybox = busybox
        self._checked: str | None | bool = False  # False: not yet; None: usable; str: why not
        self._applets: list[str] = []

    async def why_unusable(self) -> str | None:
        """None when the sandbox works here, else the reason (said once in the log)."""
        if self._checked is not False:
            return self._checked  # type: ignore[return-value]
        reason = await self._check()
        self._checked = reason
        if reason is None:
            log.info("activation scripts are evaluated in a bubblewrap sandbox (%s, %s)", self.bwrap, self.busybox)
        else:
            log.warning("activation scripts are evaluated statically (a safe subset of POSIX sh): "
                        "the bubblewrap sandbox is not usable: %s", reason)
        return reason

    async def _check(self) -> str | None:
        if not self.bwrap:
            return "bwrap is not installed (Debian: bubblewrap)"
        if not os.path.isfile(self.busybox) or not os.access(self.busybox, os.X_OK):
            return f"{self.busybox} is missing (Debian: busybox-static)"
        try:
            listed = await asyncio.to_thread(subprocess.run, [self.busybox, "--list"], capture_output=True,
                                             timeout=10, env={})
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{self.busybox} --list failed: {exc}"
        self._applets = [a for a in listed.stdout.decode(errors="replace").split() if re.match(r"^[a-z0-9_.\[-]+$", a)]
        if "sh" not in self._applets or "env" not in self._applets:
            return f"{self.busybox} has no sh or env applet"
        with tempfile.TemporaryDirectory(prefix="condery-sandbox-check-") as tmp:
            try:
                output, code, problem = await self._run(Path(tmp), [], "/opt/conda", [], [], _VARIANTS[0])
            except OSError as exc:
                return f"bwrap cannot start: {exc}"
        if problem or code != 0 or not _parse(output).done:
            return f"bwrap failed (exit {code}{', ' + problem if problem else ''}): {output[-300:]!r}"
        return None

    def _argv(self, tmp: Path, names: Sequence[str], deactivate: Sequence[str], prefix: str,
              probe_list: Sequence[tuple[str, str]], program_list: Sequence[str], variant: _Variant) -> list[str]:
        argv = [
            self.bwrap or "bwrap", "--unshare-all", "--unshare-user", "--uid", str(variant.uid), "--gid",
            str(variant.uid), "--hostname", variant.hostname, "--cap-drop", "ALL", "--die-with-parent",
            "--new-session", "--clearenv",
            "--setenv", "PATH", f"{prefix}/bin:{SANDBOX_PATH_TAIL}",
            "--setenv", "CONDA_PREFIX", prefix, "--setenv", "HOME", variant.home,
            "--ro-bind", self.busybox, "/bin/busybox", "--dev", "/dev",
            "--size", str(8 * 1024 * 1024), "--tmpfs", "/tmp",
            "--ro-bind", str(tmp / "condery"), "/.condery",
        ]
        for applet in self._applets:
            if applet != "busybox":
                argv += ["--symlink", "busybox", f"/bin/{applet}"]
        dirs = {f"{prefix}/{ACTIVATE_DIR}", f"{prefix}/{DEACTIVATE_DIR}", f"{prefix}/bin"}
        dirs.update(f"{prefix}/{rel}" for kind, rel in probe_list if kind == "d")
        dirs.update(os.path.dirname(f"{prefix}/{rel}") for kind, rel in probe_list if kind == "f")
        for directory in sorted(dirs):
            argv += ["--dir", directory]
        for rel in sorted({rel for kind, rel in probe_list if kind == "f" and not rel.startswith("bin/")}):
            argv += ["--ro-bind", str(tmp / "condery" / "empty"), f"{prefix}/{rel}"]
        for program in program_list:
            argv += ["--symlink", "/.condery/tripwire", f"{prefix}/bin/{program}"]
        for i, name in enumerate(names):
            argv += ["--ro-bind", str(tmp / "condery" / "activate" / str(i)), f"{prefix}/{ACTIVATE_DIR}/{name}"]
        for i, name in enumerate(deactivate):
            argv += ["--ro-bind", str(tmp / "condery" / "deactivate" / str(i)), f"{prefix}/{DEACTIVATE_DIR}/{name}"]
        argv += ["--remount-ro", "/", "--chdir", variant.cwd, "/bin/busybox", "sh", "/.condery/driver.sh"]
        return argv

    async def _run(self, tmp: Path, scripts: Sequence[tuple[str, str]], prefix: str,
                   probe_list: Sequence[tuple[str, str]], program_list: Sequence[str], variant: _Variant,
                   deactivate: Sequence[tuple[str, str]] = ()) -> tuple[bytes, int | None, str | None]:
        """(output, exit code, problem: a timeout or too much output)."""
        root = tmp / "condery"  # a fresh directory for each run
        for sub in ("activate", "deactivate"):
            (root / sub).mkdir(parents=True)
        (root / "driver.sh").write_text(_DRIVER)
        (root / "tripwire").write_text(_TRIPWIRE)
        (root / "tripwire").chmod(0o755)
        (root / "empty").write_bytes(b"")
        for i, (_, text) in enumerate(scripts):
            (root / "activate" / str(i)).write_text(text)
        for i, (_, text) in enumerate(deactivate):
            (root / "deactivate" / str(i)).write_text(text)
        names = [name for name, _ in scripts]
        (root / "names").write_text("".join(f"{n}\n" for n in names))
        argv = self._argv(tmp, names, [n for n, _ in deactivate], prefix, probe_list, program_list, variant)
        proc = await spawn(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                           stderr=asyncio.subprocess.DEVNULL, start_new_session=True, env={})
        chunks: list[bytes] = []
        size = 0
        problem = None
        try:
            async def read() -> None:
                nonlocal size, problem
                assert proc.stdout is not None
                while True:
                    chunk = await proc.stdout.read(65536)
                    if not chunk:
                        return
                    size += len(chunk)
                    if size > MAX_OUTPUT:
                        problem = f"printed more than {MAX_OUTPUT} bytes"
                        return
                    chunks.append(chunk)

            try:
                await asyncio.wait_for(read(), RUN_TIMEOUT)
            except asyncio.TimeoutError:
                problem = f"did not end within {RUN_TIMEOUT:g} s"
            if problem is None:
                try:
                    await asyncio.wait_for(proc.wait(), RUN_TIMEOUT)
                except asyncio.TimeoutError:
                    problem = f"did not end within {RUN_TIMEOUT:g} s"
        finally:
            await stop(proc)
        return b"".join(chunks), proc.returncode, problem

    async def evaluate(self, scripts: Sequence[tuple[str, str]], prefix: str,
                       probe_list: Sequence[tuple[str, str]] = (), program_list: Sequence[str] = (),
                       deactivate: Sequence[tuple[str, str]] = ()) -> Activation:
        """The static Env of `scripts` (name, text) sourced in this order (see the module
        docstring). The sandbox must be usable (why_unusable() is None)."""
        excluded: dict[str, str] = {}
        deadline = time.monotonic() + BUDGET
        final: dict[str, str] = {}
        start: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="condery-activation-") as tmp_name:
            tmp = Path(tmp_name)
            for attempt in range(len(scripts) + 1):
                remaining = [(n, t) for n, t in scripts if n not in excluded]
                if time.monotonic() > deadline:
                    for name, _ in remaining:
                        excluded[name] = f"not evaluated: the sandbox's {BUDGET:g} s budget ran out"
                    break
                runs = await asyncio.gather(*(self._one(tmp / f"run{attempt}-{i}", remaining, prefix, probe_list,
                                                        program_list, deactivate, variant)
                                              for i, variant in enumerate(_VARIANTS)))
                problems = _problems(remaining, runs, prefix)
                if not problems:
                    run = runs[0]
                    start = run.start or {}
                    final = (run.scripts[-1].env if run.scripts else start) or {}
                    break
                # Every script that failed is left out at once (a rerun checks the others
                # without them: they may have depended on what a failed one set).
                excluded.update(problems)
        env, path_prepend, dropped = _difference(start, final, prefix)
        for name, why in dropped.items():
            log.debug("activation: %s left out of Env: %s", name, why)
        verdicts = tuple(Verdict(n, n not in excluded, excluded.get(n)) for n, _ in scripts)
        return Activation(env, path_prepend, verdicts, "bwrap")

    async def _one(self, tmp: Path, scripts: Sequence[tuple[str, str]], prefix: str,
                   probe_list: Sequence[tuple[str, str]], program_list: Sequence[str],
                   deactivate: Sequence[tuple[str, str]], variant: _Variant) -> _Run:
        output, code, problem = await self._run(tmp, scripts, prefix, probe_list, program_list, variant, deactivate)
        run = _parse(output)
        if problem is None and not run.done:
            problem = (f"was killed (signal {code - 128}, a limit of the sandbox)" if code is not None and code > 128
                       else f"ended the shell (exit status {code})")
        run.problem = problem
        return run


def _delta(before: Mapping[str, str], after: Mapping[str, str]) -> dict[str, str | None]:
    changed: dict[str, str | None] = {k: v for k, v in after.items() if before.get(k) != v}
    changed.update({k: None for k in before if k not in after})
    return changed


def _problems(scripts: Sequence[tuple[str, str]], runs: Sequence[_Run], prefix: str) -> dict[str, str]:
    """The scripts that are not static in either run, and why: every one up to the first
    that did not end (that one included; the run stopped there)."""
    found: dict[str, str] = {}
    befores = [r.start or {} for r in runs]
    previous_path = befores[0].get("PATH", "")
    for index, (name, _) in enumerate(scripts):
        deltas = []
        problem = None
        for run_index, run in enumerate(runs):
            got = run.scripts[index] if index < len(run.scripts) else None
            if got is None or got.name != name or got.status is None or got.env is None:
                if run.start is None:
                    found[name] = f"the sandbox failed before the scripts ran ({run.problem or 'no output'})"
                else:
                    found[name] = run.problem or "left the shell before its end (exit, or break outside a loop)"
                return found
            if problem is None:
                if got.status != 0:
                    problem = f"returns status {got.status}" + (f": {_first_line(got.stderr)}" if got.stderr else "")
                elif got.calls:
                    program = _first_line(got.calls).removeprefix(f"{prefix}/bin/")
                    problem = f"runs {program}, a program of the image the sandbox does not run"
                elif got.stderr.strip():
                    problem = f"writes to stderr: {_first_line(got.stderr)}"
            deltas.append(_delta(befores[run_index], got.env))
            befores[run_index] = got.env
        if problem is None:
            differing = sorted(k for k in set(deltas[0]) | set(deltas[1])
                               if deltas[0].get(k, "\0") != deltas[1].get(k, "\0") and k not in _OWNED)
            if differing:
                problem = (f"sets {', '.join(differing)} to a value that depends on the container "
                           "(user, home, host name or working directory)")
            elif "PATH" in deltas[0] and not _is_prepend(deltas[0]["PATH"], previous_path):
                problem = "changes PATH other than by putting entries first"
        if problem is not None:
            found[name] = problem
        previous_path = befores[0].get("PATH", "")
    return found


def _is_prepend(new: str | None, old: str) -> bool:
    return new is not None and (new == old or new.endswith(":" + old))


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:200]


def _difference(start: Mapping[str, str], final: Mapping[str, str],
                prefix: str) -> tuple[dict[str, str], tuple[str, ...], dict[str, str]]:
    """(Env, PATH entries to put first, variables left out and why)."""
    env: dict[str, str] = {}
    dropped: dict[str, str] = {}
    path_prepend: tuple[str, ...] = ()
    for key, value in _delta(start, final).items():
        if key == "PATH":
            old = start.get("PATH", "")
            if value is not None and value.endswith(":" + old):
                entries = [p for p in value[:-len(old) - 1].split(":") if p and p != f"{prefix}/bin"]
                path_prepend = tuple(dict.fromkeys(entries))
            else:
                dropped[key] = "changed other than by putting entries first"
        elif value is None:
            dropped[key] = "unset (a config cannot unset a variable)"
        elif key in _OWNED:
            dropped[key] = "the shell's, the user's or the image's own"
        elif _BOOKKEEPING.search(key):
            dropped[key] = "save-and-restore bookkeeping of an activation script"
        elif not _NAME.match(key):
            dropped[key] = "not a variable name"
        elif len(value) > MAX_VALUE:
            dropped[key] = f"longer than {MAX_VALUE} characters"
        else:
            env[key] = value
    return env, path_prepend, dropped


_SANDBOX = Sandbox()


async def evaluate_activation(packages: Sequence[PackageScripts], prefix: str,
                              sandbox: Sandbox | None = None) -> Activation:
    """The image's activation, from its packages' PackageScripts in install order: the
    sandbox's answer where it works here, else the static evaluator's."""
    scripts = image_scripts(packages, prefix)
    if not scripts:
        return NO_SCRIPTS
    probe_list = probes(scripts, packages)
    sandbox = sandbox or _SANDBOX
    if await sandbox.why_unusable() is None:
        activation = await sandbox.evaluate(scripts, prefix, probe_list, programs(packages),
                                            image_scripts(packages, prefix, "deactivate"))
    else:
        activation = evaluate_static(scripts, prefix, probe_list)
    event(log, logging.INFO, "activation scripts evaluated", method=activation.method, prefix=prefix,
          scripts=len(scripts), static=len(scripts) - len(activation.not_static), env=sorted(activation.env),
          not_static="; ".join(describe(activation)) or None)
    return activation


def evaluate_static(scripts: Sequence[tuple[str, str]], prefix: str,
                    probe_list: Sequence[tuple[str, str]] = ()) -> Activation:
    """The fallback: activation_static.py's evaluator of a safe subset of POSIX sh."""
    start = {"CONDA_PREFIX": prefix, "PATH": f"{prefix}/bin:{SANDBOX_PATH_TAIL}", "HOME": "/nonexistent"}
    excluded, final = run_static(scripts, start, probe_list)
    env, path_prepend, _ = _difference(start, final, prefix)
    verdicts = tuple(Verdict(n, n not in excluded, excluded.get(n)) for n, _ in scripts)
    return Activation(env, path_prepend, verdicts, "static")


def describe(activation: Activation) -> Iterable[str]:
    for verdict in activation.not_static:
        yield f"{verdict.name}: {verdict.reason}"
