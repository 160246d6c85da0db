"""The builds API: start the build a pull would start, and follow it.

    POST /api/v1/builds        {"name": NAME, "tag": "latest"|"YYYY-MM-DD"}
                               202 + Location: /api/v1/builds/<id>, the build's state;
                               200 with state "done" when the image is already built
    GET  /api/v1/builds/<id>   the build's state (404 NAME_UNKNOWN when unknown/forgotten)
    GET  /api/v1/builds        {"builds": [...]}: in flight (oldest first), then recent ones

A prebuild is admitted like a pull from the same peer address (429 TOOMANYREQUESTS when
the queue is full) and is the same single-flight build: a pull of the name while it
builds joins it, and a second POST returns the same id. Errors use the registry's body.
"""

from __future__ import annotations

import json
import re

from aiohttp import web

from condery.auth.http import CHANNELS_KEY, MAY_PULL_KEY
from condery.image.tags import Digest, parse_reference
from condery.oci.errors import Denied, NameInvalid, NameUnknown
from condery.registry.bodies import read_bounded
from condery.registry.builder import Builder

MAX_BODY = 64 * 1024  # a name is at most a few KiB; refuse larger bodies before parsing them
_ID_RE = re.compile(r"[0-9a-f]{24}")


class BuildsAPI:
    def __init__(self, service: Builder) -> None:
        self.service = service

    async def start(self, request: web.Request) -> web.StreamResponse:
        name, tag = await _name_and_tag(request)
        image_request = await self.service.request_for(name, request.get(CHANNELS_KEY))
        may_pull = request.get(MAY_PULL_KEY)
        if may_pull is not None and not may_pull(image_request.canonical_name):
            # The builds right is not the right to build any name: a prebuild is a pull.
            raise Denied(f"you may not pull {image_request.canonical_name}, so not build it")
        reference = parse_reference(tag)  # an unserved tag: 404 MANIFEST_UNKNOWN, as a pull
        if isinstance(reference, Digest):
            raise NameInvalid("a build takes a tag (latest or YYYY-MM-DD), not a digest")
        status, already_built = await self.service.prebuild(
            image_request, reference, client=request.remote or "unknown"
        )
        if already_built:
            return web.json_response(status.to_json())
        return web.json_response(
            status.to_json(), status=202, headers={"Location": f"/api/v1/builds/{status.id}"}
        )

    async def show(self, request: web.Request) -> web.StreamResponse:
        id = request.match_info["id"]
        status = self.service.outcomes.builds.get(id) if _ID_RE.fullmatch(id) else None
        if status is None:
            shown = id if len(id) <= 40 else id[:37] + "..."
            raise NameUnknown(f"no build {shown!r} in flight or finished in the last hour; POST /api/v1/builds starts one")
        return web.json_response(status.to_json())

    async def listing(self, request: web.Request) -> web.StreamResponse:
        may_pull = request.get(MAY_PULL_KEY) or (lambda name: True)
        return web.json_response({"builds": [s.to_json() for s in self.service.outcomes.builds.listing()
                                             if may_pull(s.name)]})


async def _name_and_tag(request: web.Request) -> tuple[str, str]:
    """The body's name and tag, or NAME_INVALID saying what is wrong with it."""
    too_large = NameInvalid(f'the body is larger than {MAX_BODY} bytes; send {{"name": ..., "tag": ...}}')
    raw = await read_bounded(request, MAX_BODY, too_large)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        raise NameInvalid('the body is not JSON; send {"name": "python/numpy", "tag": "latest"}') from None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise NameInvalid('the body must be a JSON object with a string "name" (and optionally "tag")')
    tag = body.get("tag", "latest")
    if not isinstance(tag, str):
        raise NameInvalid('"tag" must be a string: latest or YYYY-MM-DD')
    return body["name"], tag


def register(app: web.Application, service: Builder) -> None:
    api = BuildsAPI(service)
    app.router.add_post("/api/v1/builds", api.start)
    app.router.add_get("/api/v1/builds", api.listing, allow_head=False)
    app.router.add_get("/api/v1/builds/{id}", api.show, allow_head=False)
