"""Command line: `condery serve`, `condery build NAME --output oci:DIR`, `condery solve NAME`,
`condery verify [--repair]`, `condery gc [--dry-run]`, `condery config`, `condery env push FILE`,
`condery --version`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

import aiohttp
from aiohttp import web
from tqdm import tqdm

from condery.auth.service import Authenticator
from condery.build.service import ImageService
from condery.build.state import AppState
from condery.common.redact import redact_text
from condery.config import Config, ConfigError, effective_yaml, load_config
from condery.image.names import NameInvalid
from condery.image.tags import Digest, parse_reference
from condery.layers.env_layer import explicit_lock
from condery.observability.logs import configure_logging
from condery.oci.errors import RegistryError
from condery.oci.layout import write_oci_layout
from condery.records.gc import collect, run_every
from condery.registry.connections import (
    ConnectionLimits,
    default_max_connections,
    default_max_connections_per_client,
    raise_open_file_limit,
    serving,
)
from condery.registry.server import ACCESS_LOG_FORMAT, create_app
from condery.storage import StorageError
from condery.storage.backends import open_store
from condery.storage.verify import verify_store

log = logging.getLogger("condery")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="condery", description=__doc__)
    parser.add_argument("--config", help="YAML configuration file (keys also as CONDERY_<KEY>)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"condery {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the registry")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)

    build = commands.add_parser("build", help="build an image into an OCI layout")
    build.add_argument("name", help="image name, e.g. python/numpy/scipy.gt.1.0")
    build.add_argument("--tag", default="latest", help="latest (default) or YYYY-MM-DD")
    build.add_argument("--output", required=True, help="oci:DIR[:TAG]")

    solve = commands.add_parser("solve", help="print the explicit lock of a name")
    solve.add_argument("name")
    solve.add_argument("--tag", default="latest")
    solve.add_argument("--platform", help="conda subdir (default: the first configured platform)")

    verify = commands.add_parser("verify", help="hash every stored blob; report (or --repair) corrupt ones")
    verify.add_argument("--repair", action="store_true", help="remove corrupt blobs (rebuilt when next needed)")

    gc = commands.add_parser("gc", help="remove the blobs and records no live image reaches (see gc: in the config)")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")

    env = commands.add_parser("env", help="environment files: push one, get an image name")
    env_commands = env.add_subparsers(dest="env_command", required=True)
    push = env_commands.add_parser("push", help="push an environment.yml, conda-lock file or @EXPLICIT lock; "
                                                "prints the image name")
    push.add_argument("file", help="the file ('-' reads standard input)")
    push.add_argument("--server", default="http://127.0.0.1:8080", help="the registry (default http://127.0.0.1:8080)")

    config = commands.add_parser("config", help="print the effective configuration as YAML, secrets masked")
    for command in (serve, build, solve, verify, gc, config):
        # `condery serve --config FILE` as well as `condery --config FILE serve`. SUPPRESS:
        # without a value here, keep the one given before the subcommand.
        command.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file")
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("condery")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)  # text until the configuration names the format
    try:
        config = load_config(
            args.config,
            host=getattr(args, "host", None),
            port=getattr(args, "port", None),
        )
        configure_logging(args.verbose, config.log_format)
        if args.command == "config":
            sys.stdout.write(effective_yaml(config))
            return 0
        if args.command == "serve":
            return asyncio.run(_serve(config))
        if args.command == "build":
            return asyncio.run(_build(config, args.name, args.tag, args.output))
        if args.command == "verify":
            return asyncio.run(_verify(config, args.repair))
        if args.command == "gc":
            return asyncio.run(_gc(config, args.dry_run))
        if args.command == "env":
            return asyncio.run(_env_push(args.file, args.server))
        return asyncio.run(_solve(config, args.name, args.tag, args.platform))
    except (ConfigError, NameInvalid, RegistryError, ValueError) as exc:
        # One line per problem (a configuration may have several), each marked as ours.
        for line in redact_text(str(getattr(exc, "message", None) or exc)).splitlines() or [""]:
            print(f"condery: {line}", file=sys.stderr)
        return 2
    except (OSError, StorageError) as exc:
        # At start-up: a store path that cannot be created, a port already taken. The
        # operator's own paths may be named here (this is their terminal, not a client).
        print(f"condery: {redact_text(_os_error_text(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _os_error_text(exc: OSError | StorageError) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


async def _serve(config: Config) -> int:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests and close the store."""
    open_files = raise_open_file_limit()
    max_connections = config.max_connections or default_max_connections(open_files)
    limits = ConnectionLimits(
        max_connections=max_connections,
        max_connections_per_client=config.max_connections_per_client
        or default_max_connections_per_client(max_connections),
        header_timeout=config.header_timeout,
        idle_timeout=config.idle_timeout,
    )
    if limits.max_connections > open_files:
        log.warning("max_connections=%d is above the open-file limit (%d)", limits.max_connections, open_files)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    app = await _serve_app(config)
    async with serving(app, config.host, config.port, limits, access_log_format=ACCESS_LOG_FORMAT):
        log.info(
            "connections: at most %d open, %d per client (open-file limit %d), headers within %ds, idle for %ds",
            limits.max_connections,
            limits.max_connections_per_client,
            open_files,
            limits.header_timeout,
            limits.idle_timeout,
        )
        await stop.wait()
    return 0


async def _serve_app(config: Config) -> web.Application:
    # Every auth file is read before anything else: a bad one stops the server at once.
    # Channel rules hold: the builder solves each caller's names with the channels it may read.
    auth = Authenticator(config.auth, channel_rules_enforced=True) if config.auth is not None else None
    state = await AppState.open(config)
    app = create_app(ImageService(state), state.store, state.metrics, auth=auth)

    async def close(_: web.Application) -> None:
        await state.close()

    async def warm_workers(_: web.Application):
        # In the background: the server answers at once, the first build finds them up.
        task = asyncio.create_task(state.layer_workers.warm())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(warm_workers)
    if config.gc.interval > 0:
        async def collecting(_: web.Application):
            task = asyncio.create_task(run_every(state.store, config.gc, state.metrics))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.cleanup_ctx.append(collecting)
    app.on_cleanup.append(close)
    log.info(
        "condery serving %s on http://%s:%d (store: %s)",
        ", ".join(config.channels),
        config.host,
        config.port,
        config.storage.path if config.storage.backend == "filesystem" else config.storage.bucket,
    )
    return app


def _reference(tag: str):
    reference = parse_reference(tag)
    if isinstance(reference, Digest):
        raise ValueError("build and solve take a tag (latest or YYYY-MM-DD), not a digest")
    return reference


class _Bar:
    """BuildProgress drawn with tqdm: bytes of every package of every platform (the sizes
    in repodata), with packages done of total and an ETA from the rate so far."""

    def __init__(self) -> None:
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="solving", file=sys.stderr)
        self.built = 0
        self.packages_done = 0
        self.packages_total = 0

    def solving(self, platform: str) -> None:
        self.bar.set_description(f"solving ({platform})")

    def solved(self, platform: str, packages: int, size: int) -> None:
        self.packages_total += packages
        self.bar.total += size
        self.bar.set_description(f"layers ({platform})")
        self._postfix("")

    def layer_done(self, platform: str, package: str, built: bool, size: int) -> None:
        self.built += built
        self.packages_done += 1
        self._postfix(package)
        self.bar.update(size)

    def assembling(self, platform: str) -> None:
        self.bar.set_description(f"manifests ({platform})")

    def _postfix(self, package: str) -> None:
        self.bar.set_postfix_str(f"{self.packages_done}/{self.packages_total} pkg {package[:40]}".rstrip())


async def _build(config: Config, name: str, tag: str, output: str) -> int:
    if not output.startswith("oci:"):
        raise ValueError("--output takes oci:DIR[:TAG]")
    target, _, out_tag = output[4:].partition(":")
    state = await AppState.open(config)
    try:
        service = ImageService(state)
        request = await service.request_for(name)
        bar = _Bar()
        try:
            ref, images = await service.build(request, _reference(tag), progress=bar)
        finally:
            bar.bar.close()
        info = await state.store.blob_info(ref.oci_digest)
        assert info is not None
        await write_oci_layout(state.store, ref.oci_digest, ref.oci_media_type, info.size, out_tag or tag, Path(target))
        print(f"{request.canonical_name}:{tag} -> {target} ({ref.oci_digest}, {bar.built} layers built)")
        return 0
    finally:
        await state.close()


async def _solve(config: Config, name: str, tag: str, platform: str | None) -> int:
    state = await AppState.open(config)
    try:
        subdir = platform or config.platforms[0]
        service = ImageService(state)
        request = await service.request_for(name)
        try:
            records = await service.solve(request, _reference(tag), subdir)
        except Exception as exc:  # SolveError, SpecError: print the solver's words
            print(f"condery: {redact_text(str(exc))}", file=sys.stderr)
            return 1
        sys.stdout.write(explicit_lock(records, subdir))
        return 0
    finally:
        await state.close()


async def _env_push(file: str, server: str) -> int:
    """POST the file to the registry; print the image name it answers (exit 0), or its error (1)."""
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    url = server.rstrip("/") + "/api/v1/environments"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(url, data=data, headers={"Content-Type": "application/yaml"}) as response:
                body = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        print(f"condery: cannot push to {redact_text(server)}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    if response.status != 201 or not isinstance(body, dict) or "name" not in body:
        errors = body.get("errors") if isinstance(body, dict) else None
        message = errors[0].get("message") if isinstance(errors, list) and errors and isinstance(errors[0], dict) \
            else f"HTTP {response.status}"
        print(f"condery: {file}: {message}", file=sys.stderr)
        return 1
    print(body["name"])
    print(f"pull: {body.get('pull')}", file=sys.stderr)
    return 0


async def _verify(config: Config, repair: bool) -> int:
    """Exit 0 when every blob matches its digest (or the corrupt ones were removed), else 1."""
    store = open_store(config.storage)
    try:
        report = await verify_store(
            store, repair, on_corrupt=lambda digest: print(f"corrupt: {digest}", flush=True)
        )
    except StorageError as exc:
        print(f"condery: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    summary = f"{report.checked} blobs checked, {len(report.corrupt)} corrupt"
    if repair:
        summary += f", {report.removed} removed (rebuilt when next needed)"
    print(summary)
    return 1 if len(report.corrupt) > report.removed else 0


async def _gc(config: Config, dry_run: bool) -> int:
    """Exit 0 when the run finished (also when it removed nothing), 1 when the store failed."""
    store = open_store(config.storage)
    try:
        report = await collect(store, config.gc, dry_run=dry_run)
    except StorageError as exc:
        print(f"condery: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print("\n".join(report.lines()))
    return 0
