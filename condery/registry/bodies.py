"""Request bodies read with a bound: a client cannot make the server hold more than it
allows, whether or not it sends a Content-Length."""

from __future__ import annotations

from aiohttp import web

from condery.oci.errors import RegistryError


async def read_bounded(request: web.Request, limit: int, too_large: RegistryError) -> bytes:
    """The whole body, or `too_large` raised as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    raw = bytearray()
    async for chunk in request.content.iter_any():  # read() would stop at what has arrived
        raw += chunk
        if len(raw) > limit:
            raise too_large
    return bytes(raw)
