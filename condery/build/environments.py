"""Environments by name: pushed files (`env/<id>`, kept in the store so that every replica
serves them) and the operator's folder (`envs/<name>`, read again when a file changes).

    push(bytes)            read strictly (image/environment.py), channels checked against
                           the configuration, stored as an `environments` record
    request_for(name)      `env/<id>` / `envs/<name>` -> the ImageRequest it stands for;
                           None for every other name (image/names.py parses those)
    listing()              the folder's environments with their current id, or the error
                           that keeps one from being served (the others are served anyway)

The folder is the operator's (trusted), its files are still read with the bounds of a
pushed file. A file is parsed again when its size, mtime or inode changes; each lookup
costs one stat, so an edit is served from the next pull without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from condery.config import Config
from condery.image.environment import (
    MAX_FILE_BYTES,
    Environment,
    EnvironmentFileError,
    Kernel,
    read_environment,
    solve_channels,
)
from condery.image.names import ImageRequest, environment_request, parse_environment_name
from condery.oci import errors
from condery.oci.grammar import COMPONENT_RE
from condery.records import kinds
from condery.storage import StorageError, Store

log = logging.getLogger("condery.environments")
ENVIRONMENT_SCHEMA = 1
_PUSHED_MEMORY = 4096  # pushed environments kept parsed in memory (each a few KB)
PUSHES_PER_MINUTE = 30  # new files one client may push in a minute (each a store record)
_SUFFIXES = (".yml", ".yaml")


@dataclass(frozen=True)
class NamedEnvironment:
    """One environment of the folder as the listing shows it."""

    name: str
    file: str  # relative to the folder
    environment: Environment | None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": f"envs/{self.name}", "file": self.file}
        if self.environment is not None:
            out["id"] = self.environment.id
            out["display_name"] = self.environment.display_name
            out["kind"] = self.environment.kind
        if self.error is not None:
            out["error"] = self.error
        return out


class PushBudget:
    """Pushes per client and minute: each push may add a record to the store, so a client
    pushing generated files as fast as it can is refused (429) rather than filling it."""

    def __init__(self, per_minute: int = PUSHES_PER_MINUTE, clients: int = 10_000) -> None:
        self.per_minute = per_minute
        self.clients = clients
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def take(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        recent = self._recent.setdefault(client, deque())
        self._recent.move_to_end(client)
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= self.per_minute:
            raise errors.TooManyRequests(f"this client pushed {self.per_minute} environments in the last minute; "
                                         "wait a little")
        recent.append(now)
        while len(self._recent) > self.clients:
            self._recent.popitem(last=False)


class Environments:
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self.folder = Path(config.environments_dir) if config.environments_dir else None
        self._pushed: OrderedDict[str, Environment] = OrderedDict()
        self._files: dict[Path, tuple[tuple[int, int, int], Environment | str]] = {}
        self.budget = PushBudget()

    # -- pushed files -------------------------------------------------------------------
    async def push(self, data: bytes, client: str = "local") -> Environment:
        """Store a pushed file; raises EnvironmentFileError (400), TooManyRequests (429) or
        StorageError. A file already stored costs no budget."""
        environment = await asyncio.to_thread(read_environment, data)
        self.check(environment)
        if await self.pushed(environment.id) is None:
            self.budget.take(client)
        record = {"schema": ENVIRONMENT_SCHEMA, **environment.as_json()}
        # Written on every push, even of a known file: gc counts `gc.keep` from the last push.
        await self.store.put_record(kinds.ENVIRONMENTS, environment.id, record)
        self._remember(environment)
        log.info("environment pushed id=%s kind=%s", environment.id, environment.kind)
        return environment

    def check(self, environment: Environment) -> None:
        """What a file names must be served by this registry (its channels, its packages'
        channels); raises EnvironmentFileError."""
        solve_channels(environment, self.config.channels)

    async def pushed(self, env_id: str) -> Environment | None:
        known = self._pushed.get(env_id)
        if known is not None:
            self._pushed.move_to_end(env_id)
            return known
        raw = await self.store.get_record(kinds.ENVIRONMENTS, env_id)
        if raw is None or raw.get("schema") != ENVIRONMENT_SCHEMA:
            return None
        try:
            environment = Environment.from_json(raw)
        except (ValueError, KeyError, TypeError, AttributeError, EnvironmentFileError):
            log.warning("environment record %s is damaged: read as absent", env_id)
            return None
        if environment.id != env_id:  # a record under another id: not this file
            log.warning("environment record %s holds another environment: read as absent", env_id)
            return None
        self._remember(environment)
        return environment

    def _remember(self, environment: Environment) -> None:
        self._pushed[environment.id] = environment
        self._pushed.move_to_end(environment.id)
        while len(self._pushed) > _PUSHED_MEMORY:
            self._pushed.popitem(last=False)

    # -- the folder ---------------------------------------------------------------------
    def named(self, name: str) -> Environment:
        """The folder's environment `name`; NameUnknown when there is none, NameInvalid
        (with the file's line and problem) when its file does not read."""
        if self.folder is None:
            raise errors.NameUnknown(f"envs/{name}: this registry serves no environments folder "
                                     "(environments_dir is not configured)")
        found = [c for c in self._candidates(name) if c.is_file()]
        if not found:
            raise errors.NameUnknown(f"no environment envs/{name} in this registry's environments folder")
        if len(found) > 1:
            raise errors.NameInvalid(f"envs/{name} is given by several files ({', '.join(self._rel(p) for p in found)})")
        result = self._read(found[0])
        if isinstance(result, str):
            raise errors.NameInvalid(f"envs/{name} ({self._rel(found[0])}): {result}")
        return result

    def _candidates(self, name: str) -> list[Path]:
        assert self.folder is not None
        return [self.folder / f"{name}.yml", self.folder / f"{name}.yaml", self.folder / name / "environment.yml"]

    def _rel(self, path: Path) -> str:
        assert self.folder is not None
        return path.relative_to(self.folder).as_posix()

    def _read(self, path: Path) -> Environment | str:
        """The file's environment, or why it is not one; parsed again only when it changed."""
        try:
            st = path.stat()
        except OSError as exc:
            return f"cannot read the file: {exc.strerror}"
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._files.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        result: Environment | str
        try:
            if st.st_size > MAX_FILE_BYTES:
                raise EnvironmentFileError(f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
            with open(path, "rb") as handle:
                environment = read_environment(handle.read(MAX_FILE_BYTES + 1))
            self.check(environment)
            result = environment
        except EnvironmentFileError as exc:
            result = str(exc)
        except OSError as exc:
            result = f"cannot read the file: {exc.strerror}"
        self._files[path] = (stamp, result)
        if isinstance(result, str):
            log.warning("environments folder: %s does not read: %s", self._rel(path), result)
        return result

    def listing(self) -> list[NamedEnvironment]:
        """Every environment of the folder, by name, with its id or its error."""
        if self.folder is None:
            return []
        files: dict[str, list[Path]] = {}
        try:
            entries = sorted(os.scandir(self.folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("environments folder cannot be listed: %s", exc.strerror)
            return []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_file() and entry.name.endswith(_SUFFIXES):
                files.setdefault(entry.name.rsplit(".", 1)[0], []).append(Path(entry.path))
            elif entry.is_dir() and (Path(entry.path) / "environment.yml").is_file():
                files.setdefault(entry.name, []).append(Path(entry.path) / "environment.yml")
        listed = []
        for name, paths in sorted(files.items()):
            rel = self._rel(paths[0])
            if not COMPONENT_RE.fullmatch(name):
                listed.append(NamedEnvironment(name, rel, None, "the name is not lowercase [a-z0-9] separated "
                                               "by '.', '_' or '-', so it cannot be an image name"))
            elif len(paths) > 1:
                listed.append(NamedEnvironment(name, rel, None, "given by several files: "
                                               + ", ".join(self._rel(p) for p in paths)))
            else:
                result = self._read(paths[0])
                listed.append(NamedEnvironment(name, rel, *((None, result) if isinstance(result, str) else (result,))))
        return listed

    # -- names --------------------------------------------------------------------------
    async def request_for(self, name: str) -> ImageRequest | None:
        """The request an environment name stands for; None when `name` is no environment name."""
        parsed = parse_environment_name(name)
        if parsed is None:
            return None
        kind, key = parsed
        if kind == "env":
            try:
                environment = await self.pushed(key)
            except StorageError as exc:
                raise errors.Unavailable(f"cannot read environment {key}: {exc}") from None
            if environment is None:
                raise errors.NameUnknown(f"no environment env/{key} was pushed to this registry "
                                         "(POST /api/v1/environments, or condery env push FILE)")
        else:
            environment = await asyncio.to_thread(self.named, key)
        return environment_request(name, environment)

    async def kernels(self, names: Sequence[str]) -> tuple[Kernel, ...]:
        """The environments a meta-package's `kernels:` names: `all` (every environment of
        the folder that reads), folder names, `env/<id>`. One that cannot be served now is a
        ManifestUnknown naming it (its file may come back)."""
        found: dict[str, Kernel] = {}
        for name in names:
            if name == "all":
                for named in await asyncio.to_thread(self.listing):
                    if named.environment is not None:
                        found.setdefault(named.name, Kernel(named.name, named.environment))
                continue
            try:
                if name.startswith("env/"):
                    environment = await self.pushed(name.removeprefix("env/"))
                    if environment is None:
                        raise errors.NameUnknown(f"no environment {name} was pushed to this registry")
                    found.setdefault(name.removeprefix("env/"), Kernel(name.removeprefix("env/"), environment))
                else:
                    found.setdefault(name, Kernel(name, await asyncio.to_thread(self.named, name)))
            except (errors.NameUnknown, errors.NameInvalid) as exc:
                raise errors.ManifestUnknown(f"kernel {name}: {exc.message}") from None
            except StorageError as exc:
                raise errors.Unavailable(f"cannot read environment {name}: {exc}") from None
        return tuple(found[k] for k in sorted(found))

    def names(self) -> Sequence[str]:
        """The folder's servable names (envs/<name>), for the landing page."""
        return [f"envs/{n.name}" for n in self.listing() if n.environment is not None]
