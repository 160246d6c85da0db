"""`/api/v1/environments`: push an environment file, get a name; list the folder's.

    POST /api/v1/environments      body: an environment.yml, a conda-lock file or an
                                   @EXPLICIT lock -> 201 {"id", "name": "env/<id>", "pull"}
    GET  /api/v1/environments      {"environments": [{"name": "envs/<n>", "file", "id" | "error"}]}

No account: the id is the content's hash, so pushing the same file twice is one name.
A file that cannot be an environment is 400 MANIFEST_INVALID naming the line; a body
past MAX_FILE_BYTES is refused before it is read whole.
"""

from __future__ import annotations

from aiohttp import web

from condery.auth.http import MAY_PULL_KEY
from condery.image.environment import MAX_FILE_BYTES, EnvironmentFileError
from condery.oci.errors import ManifestInvalid, Unavailable
from condery.registry.bodies import read_bounded
from condery.registry.builder import Builder
from condery.storage import StorageError


def pull_name(request: web.Request, name: str) -> str:
    """What a client pulls: the host it reached this registry by, the name, `latest`."""
    return f"{request.host}/{name}:latest"


def register(app: web.Application, service: Builder) -> None:
    async def push(request: web.Request) -> web.StreamResponse:
        too_large = ManifestInvalid(f"the file is larger than {MAX_FILE_BYTES // 1024} KiB")
        body = await read_bounded(request, MAX_FILE_BYTES, too_large)
        try:
            environment = await service.environments.push(body, request.remote or "unknown")
        except EnvironmentFileError as exc:
            raise ManifestInvalid(f"not an environment file: {exc}") from None
        except StorageError as exc:
            raise Unavailable(f"cannot store the environment: {exc}") from None
        name = f"env/{environment.id}"
        return web.json_response(
            {"id": environment.id, "name": name, "pull": pull_name(request, name), "kind": environment.kind},
            status=201, headers={"Location": f"/api/v1/images/{name}/latest"},
        )

    async def listing(request: web.Request) -> web.StreamResponse:
        may_pull = request.get(MAY_PULL_KEY) or (lambda name: True)  # under auth: what the caller may pull
        return web.json_response({"environments": [n.as_json() for n in service.environments.listing()
                                                   if may_pull(f"envs/{n.name}")]})

    app.router.add_post("/api/v1/environments", push)
    app.router.add_get("/api/v1/environments", listing, allow_head=False)
