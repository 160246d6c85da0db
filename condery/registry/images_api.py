"""Look before you pull: the images API.

    GET /api/v1/images/<name>/<tag>   the solved packages per platform (solves, never builds),
                                      the manifest digest and layers once built
    GET /api/v1/images/<name>/<tag>/environment.yml   the image as a file (build/readback.py):
                       /explicit.txt, /conda-lock.yml    `?platform=linux-64` picks one
    GET /api/v1/compose?specs=...     typed conda specs (one per line) -> the image name

Errors are the registry's: the error middleware in server.py answers a RegistryError in
the spec's body (400 NAME_INVALID, 404 MANIFEST_UNKNOWN with the solver's reason, 503
UNAVAILABLE), with credentials removed.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiohttp import web

from condery.auth.http import CHANNELS_KEY
from condery.build import readback
from condery.build.look import ImageLook
from condery.image.compose import compose
from condery.image.environment import solve_channels
from condery.image.names import ImageRequest
from condery.image.tags import Digest, Latest, Snapshot, parse_reference
from condery.oci.errors import ManifestUnknown, NameInvalid
from condery.registry.builder import Builder


def split_name_tag(path: str) -> tuple[str, str]:
    """`<name>/<tag>` -> (name, tag): names hold slashes, a tag never does."""
    name, slash, tag = path.rpartition("/")
    if not slash or not name or not tag:
        raise NameInvalid(f"expected <name>/<tag>, such as numpy/scipy.gt.1.0/latest, not {path[:80]!r}")
    return name, tag


async def look(service: Builder, path: str, channels: Sequence[str] | None = None) -> ImageLook:
    """What `<name>/<tag>` solves to and, once built, what a pull gets; raises RegistryError.
    `channels`: those the caller may read (auth's channel rules), None: all."""
    name, tag = split_name_tag(path)
    request, reference = await _request(service, name, tag, channels)
    return await service.look(request, reference)


async def _request(service: Builder, name: str, tag: str,
                   channels: Sequence[str] | None) -> tuple[ImageRequest, Latest | Snapshot]:
    request = await service.request_for(name, channels)
    reference = parse_reference(tag)
    if isinstance(reference, Digest):
        raise ManifestUnknown("look at a tag ('latest' or a past 'YYYY-MM-DD'), not a digest")
    return request, reference


async def read_back(service: Builder, path: str, file: str, platform: str | None,
                    channels: Sequence[str] | None = None) -> str:
    """The image of `<name>/<tag>` as `file` (one of readback.FORMATS)."""
    name, tag = split_name_tag(path)
    request, reference = await _request(service, name, tag, channels)
    found = await service.look(request, reference)
    channels = list(service.config.channels)
    if request.environment is not None:
        channels = list(solve_channels(request.environment, service.config.channels)[0])
    return readback.read_back(found, request, channels, file, platform)


def register(app: web.Application, service: Builder) -> None:
    async def image(request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        head, _, file = tail.rpartition("/")
        if file in readback.FORMATS and head.count("/") >= 1:
            text = await read_back(service, head, file, request.query.get("platform"), request.get(CHANNELS_KEY))
            kind = "text/plain" if file.endswith(".txt") else "application/yaml"
            return web.Response(text=text, content_type=kind,
                                headers={"Content-Disposition": f'inline; filename="{file}"'})
        return web.json_response((await look(service, tail, request.get(CHANNELS_KEY))).as_json())

    async def composed(request: web.Request) -> web.StreamResponse:
        result = compose(request.query.get("specs", ""), service.meta_packages)
        return web.json_response({
            "name": result.name,
            "problems": [{"spec": spec, "reason": reason} for spec, reason in result.problems],
        })

    app.router.add_get("/api/v1/images/{tail:.+}", image)
    app.router.add_get("/api/v1/compose", composed)
