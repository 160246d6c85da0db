"""The layers of one image: each package's layer (from the cache or built once), the
groups that keep the image under the layer budget, and the environment layer.

Keys and records are condery/records/'s; this module only builds what is missing, one
build per key however many images ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import rattler

from condery.build.state import AppState
from condery.common.singleflight import SingleFlight
from condery.image.names import ImageRequest
from condery.layers import LayerBlob, PackageError
from condery.layers.activation import Activation
from condery.layers.activation_scripts import PackageScripts, read_package_scripts
from condery.layers.bytecode import BytecodePlan, bytecode_for
from condery.layers.concat import LayerSource, NotConcatenable, concat_compressed, worth_concatenating
from condery.layers.env_layer import Account, build_env_layer
from condery.layers.grouping import group_layers
from condery.layers.members import PackageLimits
from condery.layers.package_layer import LayerReport, build_package_layer, fetch_verified
from condery.layers.tarball import concat_layers
from condery.layers.wheels import PinnedWheel, PipTarget, build_wheel_layer, fetch_wheel
from condery.records.cache import RecordCache
from condery.records.keys import group_key, layer_key, wheel_layer_key
from condery.records.schemas import LayerEntry


class LayerBuilder:
    def __init__(self, state: AppState, records: RecordCache) -> None:
        self.state = state
        self.config = state.config
        self.store = state.store
        self.records = records
        # A layer build nobody waits for any more (its image builds timed out) is cancelled.
        self.flights: SingleFlight[LayerEntry] = SingleFlight(cancel_abandoned=True)

    async def package_layer(
        self, record: rattler.RepoDataRecord, python: rattler.RepoDataRecord | None,
        site_packages: str | None, subdir: str, report: LayerReport | None = None,
        bytecode: BytecodePlan | None = None, prefix: str | None = None, owner: tuple[int, int] | None = None,
    ) -> tuple[LayerEntry, bool]:
        """The package's layer from the cache, or built now (once, however many ask);
        and whether it was built. `bytecode` is the image's plan (layers/bytecode.py);
        `prefix` where the package goes (a kernel's environment: <prefix>/envs/<name>);
        `owner` the (uid, gid) of a changeable environment (None: root's)."""
        bytecode = bytecode_for(record, bytecode)
        prefix = prefix or self.config.prefix
        key = layer_key(
            record, prefix=prefix, site_packages=site_packages,
            allow_scripts=self.config.allow_package_scripts, bytecode=bytecode.tag if bytecode else None,
            compression=self.config.layer_compression, owner=owner,
        )
        cached = await self.records.layer(key)
        if cached is not None:
            return cached, False

        async def build() -> LayerEntry:
            # The download waits in its own slots, the install and tar in the CPU slots.
            blob = await build_package_layer(
                record,
                python_record=python,
                prefix=prefix,
                platform=subdir,
                work_dir=self.state.work_dir,
                package_cache_dir=self.config.package_cache_dir,
                allow_scripts=self.config.allow_package_scripts,
                limits=PackageLimits(self.config.max_package_unpacked_size, self.config.max_package_files),
                download_slots=self.state.download_slots,
                cpu_slots=self.state.cpu_slots,
                client=self.state.download_client,
                report=report,
                bytecode=bytecode,
                compression=self.config.layer_compression,
                owner=owner,
                workers=self.state.layer_workers,
            )
            try:
                scripts = blob.scripts if blob.scripts is not None else await self._package_scripts(record)
            except BaseException:
                blob.path.unlink(missing_ok=True)
                raise
            with report.timed("store") if report else contextlib.nullcontext():
                return await self._store(key, blob, (record.file_name,), scripts)

        return await self.flights.run(key, build), True

    async def wheel_layer(self, wheel: PinnedWheel, target: PipTarget, bytecode: BytecodePlan | None,
                          owner: tuple[int, int] | None = None) -> tuple[LayerEntry, bool]:
        """The layer of one pip wheel (layers/wheels.py) from the cache, or built now (once,
        however many ask); and whether it was built. `bytecode` is the image's plan, `owner`
        package_layer's."""
        key = wheel_layer_key(wheel, target, bytecode=bytecode.tag if bytecode else None,
                              compression=self.config.layer_compression, owner=owner)
        cached = await self.records.layer(key)
        if cached is not None:
            return cached, False
        limits = PackageLimits(self.config.max_package_unpacked_size, self.config.max_package_files)

        async def build() -> LayerEntry:
            # As package_layer: the download in its own slots, the install and tar in the CPU slots.
            async with self.state.download_slots:
                path = await fetch_wheel(wheel, self.config.package_cache_dir, max_bytes=limits.max_unpacked_bytes)
            async with self.state.cpu_slots:
                fd, out_name = tempfile.mkstemp(dir=self.state.work_dir, prefix=f"wheel-{wheel.name}-",
                                                suffix=".tar.gz")
                os.close(fd)
                out_path = Path(out_name)
                try:
                    blob = await build_wheel_layer(path, wheel, target, out_path,
                                                   compression=self.config.layer_compression,
                                                   bytecode=bytecode, limits=limits, owner=owner)
                except BaseException:
                    out_path.unlink(missing_ok=True)
                    raise
            return await self._store(key, blob, (wheel.filename,))

        return await self.flights.run(key, build), True

    async def grouped(self, package_layers: Sequence[LayerEntry], room: int) -> list[LayerEntry]:
        """Package layers in install order, merged into groups when they exceed `room`."""
        if len(package_layers) <= room:
            return list(package_layers)
        position = {entry.key: i for i, entry in enumerate(package_layers)}
        by_key = {entry.key: entry for entry in package_layers}
        groups = group_layers({e.key: e.size for e in package_layers}, room)
        groups = sorted(groups, key=lambda g: min(position[k] for k in g.members))
        merged = []
        for group in groups:
            members = sorted(group.members, key=position.__getitem__)
            if len(members) == 1:
                merged.append(by_key[members[0]])
            else:
                merged.append(await self._group_layer([by_key[k] for k in members]))
        return merged

    async def _group_layer(self, members: Sequence[LayerEntry]) -> LayerEntry:
        key = group_key([m.key for m in members])
        cached = await self.records.layer(key)
        if cached is not None:
            return cached

        async def build() -> LayerEntry:
            with tempfile.TemporaryDirectory(dir=self.state.work_dir) as tmp, contextlib.ExitStack() as opened:
                sources: list[LayerSource] = []
                for i, member in enumerate(members):
                    # The store's own file where it has one (filesystem): read in place, not copied.
                    handle = await self.store.open_blob_file(member.digest)
                    if handle is not None:
                        sources.append(opened.enter_context(handle))
                        continue
                    path = Path(tmp) / f"{i}.tar.gz"
                    with open(path, "wb") as out:
                        async for chunk in self.store.read_blob(member.digest):
                            out.write(chunk)
                    sources.append(path)
                blob = await asyncio.to_thread(_concat, sources, Path(tmp) / "group.tar.gz",
                                               self.config.layer_compression,
                                               worth_concatenating([m.size for m in members]))
                return await self._store(key, blob, tuple(p for m in members for p in m.packages))

        return await self.flights.run(key, build)

    async def _package_scripts(self, record: rattler.RepoDataRecord) -> PackageScripts:
        """The package's part in activation (layers/activation_scripts.py), read from the
        archive its layer was just built from (verified, in the package cache; fetched
        again if the cache's cap removed it meanwhile): kept in the layer record, so that
        an image built from cached layers knows its activation scripts."""
        archive = Path(self.config.package_cache_dir) / "archives" / (record.sha256 or b"").hex() / record.file_name
        if not archive.exists():
            archive = await fetch_verified(record, self.config.package_cache_dir, self.config.max_package_unpacked_size,
                                           self.state.download_client)
        try:
            return await read_package_scripts(archive)
        except Exception as exc:
            raise PackageError(f"{record.file_name}: cannot read its activation scripts ({type(exc).__name__})") from exc

    async def _store(self, key: str, blob: LayerBlob, packages: tuple[str, ...],
                     scripts: PackageScripts | None = None) -> LayerEntry:
        # The blob before the record that points at it: a crash leaves an orphan at worst.
        await self.store.put_blob_file(blob.digest, blob.path)
        entry = LayerEntry(key, blob.digest, blob.diff_id, blob.size, packages, scripts)
        await self.records.put_layer(entry)
        return entry

    async def env_layer(
        self, request: ImageRequest, records: Sequence[rattler.RepoDataRecord], subdir: str, created: datetime,
        account: Account | None = None, files: Mapping[str, str] | None = None, prefix: str | None = None,
        activation: Activation | None = None, owner: tuple[int, int] | None = None,
    ) -> LayerEntry:
        """The layer of what belongs to this environment only; `files` are more of it
        (relative to the prefix). With `prefix` (a kernel's environment), only what is
        under it: the system's files (profile, accounts) are the image's own environment's.
        `owner`: package_layer's."""
        with tempfile.TemporaryDirectory(dir=self.state.work_dir) as tmp:
            blob = await asyncio.to_thread(
                build_env_layer,
                records,
                requested_specs=request.specs,
                prefix=prefix or self.config.prefix,
                platform=subdir,
                created=created,
                out_path=Path(tmp) / "env.tar.gz",
                command=f"condery {request.canonical_name}",
                account=account,
                compression=self.config.layer_compression,
                variables=dict(request.environment.variables) if request.environment else None,
                meta_files=files,
                activation=activation,
                with_system=prefix is None,
                owner=owner,
            )
            await self.store.put_blob_file(blob.digest, blob.path)
        return LayerEntry("env", blob.digest, blob.diff_id, blob.size, ("environment",))


def _concat(sources: Sequence[LayerSource], out_path: Path, compression: str, concatenate: bool = True) -> LayerBlob:
    """The group layer: the members' compressed bytes one after the other (layers/concat.py),
    or decompressed and compressed again where that cannot be (a file in two layers) or is
    not worth it (`concatenate` false: small layers, concat.worth_concatenating). Both
    give the same tar (diff_id)."""
    if concatenate:
        try:
            return concat_compressed(sources, out_path, compression)
        except NotConcatenable:
            pass
    return concat_layers(sources, out_path, compression)
