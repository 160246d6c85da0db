"""What the HTTP side needs from the builder: one Protocol, and nothing else of it.

Every handler (the pull API, the images and builds APIs, the landing page) is typed
against `Builder`; condery.build.service.ImageService is the one implementation, and
tests may pass a stand-in that has these members. The types named here are the
builder's plain records (what a look found, a build's status, the queue's counts), read
and shown, never driven.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from condery.build.admission import BuildQueue
from condery.build.environments import Environments
from condery.build.look import ImageLook
from condery.build.outcomes import Outcomes
from condery.build.progress import BuildStatus
from condery.config import Config
from condery.image.meta import MetaPackage
from condery.image.names import ImageRef, ImageRequest
from condery.image.tags import Latest, Snapshot


class Builder(Protocol):
    @property
    def config(self) -> Config:
        """The configuration the images are built under (the landing page shows it)."""
        ...

    @property
    def meta_packages(self) -> Mapping[str, MetaPackage]:
        """The meta-packages a name may use (name parsing needs them)."""
        ...

    @property
    def builds(self) -> BuildQueue[ImageRef]:
        """The build queue, for its counts."""
        ...

    @property
    def outcomes(self) -> Outcomes:
        """Recent failures and build statuses."""
        ...

    @property
    def environments(self) -> Environments:
        """Pushed environment files and the environments folder."""
        ...

    async def request_for(self, name: str, channels: Sequence[str] | None = None) -> ImageRequest:
        """What a repository name stands for (an environment, or specs); raises RegistryError.
        `channels`: the configured channels the caller may read (auth's channel rules), None: all."""
        ...

    async def resolve(self, request: ImageRequest, reference: Latest | Snapshot, client: str) -> ImageRef:
        """The image for a name and tag, built if needed; raises RegistryError.

        `client` is the peer address, for per-client build limits (behind a reverse
        proxy, that is the proxy). Cancelling the call means the client has gone.
        """
        ...

    async def prebuild(
        self, request: ImageRequest, reference: Latest | Snapshot, client: str
    ) -> tuple[BuildStatus, bool]:
        """Start the build a pull would start without waiting: its status, and whether it was built already."""
        ...

    async def look(self, request: ImageRequest, reference: Latest | Snapshot) -> ImageLook:
        """What a name and tag solve to and, once built, what a pull gets; never builds."""
        ...

    async def holds(self, request: ImageRequest, digest: str) -> bool:
        """Whether an image of this name (and caller's channels) names `digest` (auth)."""
        ...

    async def manifest_media_type(self, digest: str) -> str | None:
        """The mediaType of a manifest or index stored by digest, None if unknown."""
        ...

    async def tags(self, request: ImageRequest) -> list[str]:
        """Tags known for the request's canonical name."""
        ...
