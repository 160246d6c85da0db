"""Python bytecode in package layers, compiled once at build time as conda does at install.

Without it every container start recompiles each imported module, and a non-root user
(uid 1000 in a JupyterHub image) cannot write `__pycache__` in the root-owned
environment, so it recompiles on every start, for ever.

Deterministic by construction: `unchecked-hash` pycs (PEP 552) hold a hash of the source
instead of its mtime and are never checked against it, the hash seed is fixed (frozenset
constants are marshalled in hash order), and `co_filename` is the path inside the image
so tracebacks show real paths. The same package then gives the same pyc bytes on every
build with the same interpreter version.

The compiler runs in a subprocess of a host interpreter of exactly the image's
major.minor: the server's own if it matches, else `pythonX.Y` on PATH. compileall and
py_compile only parse the package's sources, never run them; the subprocess still gets
a minimal environment (no credentials of the server's), no stdin, an empty working
directory (so no package file shadows a stdlib module) and a time limit, and writes only
into a fresh directory from which condery moves the files into the layer.

Why not the image's own interpreter, even on a matching platform: it is a binary from
the channel, and running it is running channel code on the build host, which condery does
only with `allow_package_scripts`; it also lives in another package's layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import rattler

from condery.common.children import spawn, stop
from condery.layers import PackageError, PackageUnavailable

# A big package (thousands of modules) compiles in well under a minute on one core.
COMPILE_TIMEOUT = 300.0  # seconds
PROBE_TIMEOUT = 20.0  # seconds, for asking a host interpreter its version
# Only what a stdlib-only compile needs. The fixed hash seed makes frozenset constants
# (`x in {"a", "b"}`) marshal in one order; an unset or random seed does not.
_CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0"}
# -S: no site module (no .pth file of the host runs), -s: no user site directory.
_CHILD_FLAGS = ("-S", "-s")
_PROBE = "import sys; print(sys.implementation.cache_tag); print(sys.executable)"
# Reads [[source, pyc, co_filename], ...]; a source that does not compile (Python 2 only
# code, a template) is left without a pyc, as conda leaves it.
_COMPILE = """
import json, py_compile, sys
mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
with open(sys.argv[1], encoding="utf-8") as f:
    jobs = json.load(f)
for source, cfile, dfile in jobs:
    try:
        py_compile.compile(source, cfile=cfile, dfile=dfile, doraise=True, invalidation_mode=mode)
    except py_compile.PyCompileError:
        pass
"""


@dataclass(frozen=True)
class Interpreter:
    executable: str
    cache_tag: str  # "cpython-311": the pyc file name part, and the layer key's


@dataclass(frozen=True)
class BytecodePlan:
    """How this image's python wants its bytecode: where its modules live, which tag."""

    interpreter: Interpreter
    lib_dir: str  # "lib/python3.11": sources below it are importable modules

    @property
    def tag(self) -> str:
        return self.interpreter.cache_tag


@dataclass(frozen=True)
class CompiledFile:
    path: str  # relative to the prefix
    sha256: str
    size: int


@dataclass
class HostInterpreters:
    """Host interpreters by version, each asked once per process (AppState holds one).

    `search_path` is where `pythonX.Y` is looked for (the server's PATH by default).
    """

    search_path: str | None = None
    _found: dict[tuple[int, int], Interpreter | None] = field(default_factory=dict, init=False, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    async def find(self, major: int, minor: int) -> Interpreter | None:
        async with self._lock:
            if (major, minor) not in self._found:
                self._found[(major, minor)] = await self._probe(major, minor)
            return self._found[(major, minor)]

    async def _probe(self, major: int, minor: int) -> Interpreter | None:
        want = f"cpython-{major}{minor}"
        candidates = []
        if sys.implementation.cache_tag == want:
            candidates.append(sys.executable)
        found = shutil.which(f"python{major}.{minor}", path=self.search_path)
        if found:
            candidates.append(found)
        for candidate in candidates:
            try:
                out = await _run([candidate, *_CHILD_FLAGS, "-c", _PROBE], PROBE_TIMEOUT, cwd=None)
            except (OSError, _Failed):
                continue  # e.g. a pyenv shim for a version that is not selected
            lines = out.splitlines()
            # The real executable, not a shim that would need the server's environment.
            if len(lines) == 2 and lines[0] == want and os.path.isabs(lines[1]):
                return Interpreter(lines[1], want)
        return None


async def plan_bytecode(python_record: rattler.RepoDataRecord | None, site_packages: str | None,
                        interpreters: HostInterpreters) -> BytecodePlan | str:
    """The plan for this image's python, or why its packages get no bytecode."""
    if python_record is None or site_packages is None:
        return "the environment has no python"
    if "pypy" in str(python_record.build):
        return "the image's python is PyPy"
    major, minor = rattler.Version(str(python_record.version)).as_major_minor()
    lib_dir = f"lib/python{major}.{minor}"
    if site_packages != f"{lib_dir}/site-packages":
        # e.g. a free-threading build (python3.13t): another ABI than any host CPython's.
        return f"the image's python {major}.{minor} keeps its modules in {site_packages}"
    interpreter = await interpreters.find(major, minor)
    if interpreter is None:
        return f"the build host has no python{major}.{minor}"
    return BytecodePlan(interpreter, lib_dir)


def wants_bytecode(record: rattler.PackageRecord) -> bool:
    """Packages whose .py files are importable by the image's python: `noarch: python`
    ones, and those built for one python (they depend on it). Others (zlib...) keep one
    layer for every python version."""
    if record.name.normalized == "python":
        return False  # conda-built pythons ship their own; recompiling the stdlib is slow
    if record.noarch.python:
        return True
    return any(str(dep).split(" ", 1)[0] == "python" for dep in record.depends)


def bytecode_for(record: rattler.PackageRecord, plan: BytecodePlan | None) -> BytecodePlan | None:
    """The plan this package's layer uses (the layer key names its tag), or None."""
    return plan if plan is not None and wants_bytecode(record) else None


async def compile_bytecode(target: Path, dist: str, plan: BytecodePlan, *, prefix: str,
                           work_dir: Path) -> list[CompiledFile]:
    """Compile the package's modules that ship no pyc; put the pycs in `target`.

    `target` is the installed package at the staging prefix, its record in
    conda-meta/<dist>.json. Returns what was added, for that record.
    """
    try:
        files = json.loads((target / "conda-meta" / f"{dist}.json").read_text()).get("files") or []
    except (OSError, ValueError):
        return []  # the layer's finishing step reports the missing record
    jobs = _jobs(target, [str(f) for f in files], plan)
    if not jobs:
        return []
    scratch = Path(tempfile.mkdtemp(dir=work_dir, prefix=".pyc-"))
    try:
        out, cwd = scratch / "out", scratch / "cwd"
        out.mkdir()
        cwd.mkdir()
        list_file = scratch / "jobs.json"
        list_file.write_text(json.dumps(
            [[str(target / src), str(out / pyc), f"{prefix.rstrip('/')}/{src}"] for src, pyc in jobs]
        ))
        try:
            await _run([plan.interpreter.executable, *_CHILD_FLAGS, "-c", _COMPILE, str(list_file)],
                       COMPILE_TIMEOUT, cwd=cwd)
        except _Failed as exc:
            raise PackageUnavailable(f"{dist}: compiling its python modules {exc}") from None
        try:
            return await asyncio.to_thread(_move_into, out, target, [pyc for _, pyc in jobs])
        except PackageError as exc:
            raise PackageError(f"{dist}: {exc}") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)


def record_compiled(data: dict[str, Any], compiled: Sequence[CompiledFile]) -> None:
    """Add the pycs to a conda-meta record, as conda records the ones it compiles
    (`pyc_file`), so `conda list`, uninstall and verify tools see them."""
    if not compiled:
        return
    data["files"] = [*data.get("files", []), *(c.path for c in compiled)]
    paths_data = data.setdefault("paths_data", {"paths": [], "paths_version": 1})
    paths_data["paths"] = [*paths_data.get("paths", []), *(
        {"_path": c.path, "path_type": "pyc_file", "sha256": c.sha256, "size_in_bytes": c.size}
        for c in compiled
    )]


def _jobs(target: Path, files: list[str], plan: BytecodePlan) -> list[tuple[str, str]]:
    """(source, pyc) pairs, relative to the prefix, in sorted order.

    Only regular files with no symlink on their way from the prefix are compiled: the
    compiler reads what it compiles, and a link could name a file of the build host.
    """
    recorded = set(files)
    safe_dirs: dict[str, bool] = {}
    jobs = []
    for src in sorted(files):
        if not src.endswith(".py") or not src.startswith(plan.lib_dir + "/"):
            continue
        directory, name = src.rsplit("/", 1)
        pyc = f"{directory}/__pycache__/{name[:-3]}.{plan.tag}.pyc"
        if pyc in recorded or not _plain_dir(target, directory, safe_dirs):
            continue
        try:
            regular = stat.S_ISREG(os.lstat(target / src).st_mode)
        except OSError:
            regular = False
        if regular:
            jobs.append((src, pyc))
    return jobs


def _plain_dir(target: Path, rel: str, seen: dict[str, bool]) -> bool:
    """Whether every component of `rel` below `target` is a real directory."""
    if rel in seen:
        return seen[rel]
    parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
    ok = (not parent or _plain_dir(target, parent, seen))
    if ok:
        try:
            ok = stat.S_ISDIR(os.lstat(target / rel).st_mode)
        except OSError:
            ok = False
    seen[rel] = ok
    return ok


def _move_into(out: Path, target: Path, pycs: list[str]) -> list[CompiledFile]:
    compiled = []
    for pyc in pycs:
        made = out / pyc
        if not made.is_file() or made.is_symlink():
            continue  # the source did not compile
        cache_dir = target / pyc.rsplit("/", 1)[0]
        with contextlib.suppress(FileExistsError):
            cache_dir.mkdir()
        # A `__pycache__` link or file of the package's own is no place to write into;
        # a stray pyc file (e.g. a post-link script's) is replaced (os.replace never follows a link).
        existing = os.lstat(target / pyc).st_mode if os.path.lexists(target / pyc) else stat.S_IFREG
        if not stat.S_ISDIR(os.lstat(cache_dir).st_mode) or not (stat.S_ISREG(existing) or stat.S_ISLNK(existing)):
            raise PackageError(f"the package has its own {pyc!r}, in the way of its bytecode")
        os.replace(made, target / pyc)
        data = (target / pyc).read_bytes()
        compiled.append(CompiledFile(pyc, hashlib.sha256(data).hexdigest(), len(data)))
    return compiled


class _Failed(Exception):
    """The child did not finish well; the message says how, without any path."""


async def _run(argv: list[str], timeout: float, *, cwd: Path | None) -> str:
    """Run a host interpreter with the minimal environment; its stdout on success.

    Killed on timeout and on cancellation (an abandoned build must not leave it running),
    and by the kernel when the server dies (it would write on into the store's staging).
    """
    proc = await spawn(
        *argv, cwd=cwd, env=_CHILD_ENV, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    try:
        stdout, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        raise _Failed(f"took longer than {timeout:.0f} s") from None
    finally:
        await stop(proc)
    if proc.returncode != 0:
        raise _Failed(f"failed (exit status {proc.returncode})")
    return stdout.decode("utf-8", "replace")
