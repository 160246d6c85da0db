"""Errors of the distribution spec, with the HTTP status each one is answered with.

Anything that reaches a client is a `RegistryError`; the server turns it into the
spec's body `{"errors": [{"code", "message", "detail"}]}`. `message` is what a user
reads (skopeo prints it after the code), so it is the specific explanation — the
solver's, the name grammar's — not the spec's generic sentence. Statuses follow the
distribution spec and CNCF Distribution's `registry/api/v2/errors.go`.

This module knows nothing of aiohttp so that the builder can raise these too.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable


class RegistryError(Exception):
    """An error answered to the client in the spec's format.

    Subclasses fix `code` and `status`; the base class takes them as arguments for the
    rare code without a subclass.
    """

    code: str = "UNKNOWN"
    status: int = 500
    default_message: ClassVar[str] = "internal error"
    # Seconds a client should wait before retrying (the `Retry-After` header); set on
    # the errors that describe a passing condition (503, 429).
    retry_after: int | None = None

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.message = message if message is not None else self.default_message
        self.detail = detail
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(f"{self.code}: {self.message}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class BlobUploadUnknown(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "invalid digest"


class ManifestBlobUnknown(RegistryError):
    code, status, default_message = "MANIFEST_BLOB_UNKNOWN", 404, "manifest references an unknown blob"


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class SizeInvalid(RegistryError):
    code, status, default_message = "SIZE_INVALID", 400, "provided length did not match content length"


class Unauthorized(RegistryError):
    code, status, default_message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "the operation is unsupported"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"
    retry_after = 10


class PaginationNumberInvalid(RegistryError):
    code, status, default_message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"


class RangeInvalid(RegistryError):
    code, status, default_message = "RANGE_INVALID", 416, "invalid content range"


class Unavailable(RegistryError):
    """A passing fault (channel, upstream base, store, timeout, disk full); retry later.

    UNAVAILABLE is CNCF Distribution's code (the OCI spec has none for this); DESIGN.md
    makes it condery's contract so that clients can tell a passing fault from a "no".
    """

    code, status, default_message = "UNAVAILABLE", 503, "service temporarily unavailable, retry later"
    retry_after = 30


def error_body(errors: Iterable[RegistryError]) -> dict[str, list[dict[str, Any]]]:
    """The spec's error document for one or more errors."""
    return {"errors": [error.to_dict() for error in errors]}
