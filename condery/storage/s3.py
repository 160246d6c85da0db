"""The S3 store: blobs and records as objects in one bucket (aiobotocore).

    blobs/sha256/<hex>            content-addressed blobs
    records/<kind>/<key>.json     JSON records

Atomicity comes from S3 itself: a PUT (or a completed multipart upload) makes an object
appear whole or not at all, so there is no staging area. Credentials, region and the
like come from aiobotocore's default chain (AWS_* environment variables, ~/.aws/...);
the bucket must exist: operators create buckets, the registry only uses one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from condery.common.jsonobject import json_object
from condery.oci.grammar import is_digest
from condery.storage import (
    BlobInfo,
    Listed,
    StorageError,
    Store,
    check_digest,
    check_record_key,
    os_error_text,
)

if TYPE_CHECKING:
    from condery.config import StorageConfig

# Parts are read whole into memory one at a time, so this also bounds the memory one
# upload uses. S3 wants parts of at least 5 MiB (except the last) and at most 10,000.
PART_SIZE = 8 << 20
MAX_PARTS = 10_000
REDIRECT_EXPIRY = 15 * 60  # seconds a presigned blob URL stays valid
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_MESSAGE_LIMIT = 300


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: ClientError) -> bool:
    return _error_code(exc) in _NOT_FOUND


@contextlib.contextmanager
def _failures(action: str) -> Iterator[None]:
    """Turn botocore and network failures into StorageError with a short message.

    botocore's messages name the operation and the server's error code, never the
    credentials; they are still cut short because servers may answer with long bodies.
    """
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        detail = f"{error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
        raise StorageError(f"S3 {action} failed ({detail})"[:_MESSAGE_LIMIT]) from exc
    except (BotoCoreError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise StorageError(f"S3 {action} failed ({type(exc).__name__}: {exc})"[:_MESSAGE_LIMIT]) from exc


class S3Store(Store):
    def __init__(self, config: StorageConfig) -> None:
        if not config.bucket:
            raise ValueError("the s3 storage backend needs a bucket")
        self.config = config
        self.bucket: str = config.bucket
        self._session = get_session()
        self._stack: AsyncExitStack | None = None
        self._s3: Any = None  # aiobotocore's S3 client (its types are generated at run time)
        self._lock = asyncio.Lock()

    # -- the client ----------------------------------------------------------
    async def _client(self) -> Any:
        """The S3 client, created and checked against the bucket once, then reused."""
        if self._s3 is not None:
            return self._s3
        async with self._lock:
            if self._s3 is None:
                stack = AsyncExitStack()
                try:
                    with _failures(f"connection to bucket {self.bucket!r}"):
                        client = await stack.enter_async_context(self._create_client())
                        await self._check_bucket(client)
                except BaseException:
                    await stack.aclose()
                    raise
                self._stack, self._s3 = stack, client
        return self._s3

    def _create_client(self) -> Any:
        # S3-compatible servers (SeaweedFS, MinIO, Ceph) are addressed by path; AWS itself
        # is left to botocore's choice.
        s3_options = {"addressing_style": "path"} if self.config.endpoint_url else {}
        return self._session.create_client(
            "s3",
            endpoint_url=self.config.endpoint_url,
            region_name=self.config.region,
            config=AioConfig(
                signature_version="s3v4",
                s3=s3_options,
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
            ),
        )

    async def _check_bucket(self, client: Any) -> None:
        # A HEAD on an object of a missing bucket is a plain 404, indistinguishable from a
        # missing blob: without this check a misconfigured bucket would look empty.
        try:
            await client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _is_not_found(exc):
                raise StorageError(f"S3 bucket {self.bucket!r} does not exist (create it first)") from None
            if _error_code(exc) in ("403", "AccessDenied"):
                raise StorageError(f"S3 bucket {self.bucket!r}: access denied") from None
            raise

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._s3 = self._stack, None, None
            if stack is not None:
                await stack.aclose()

    async def ping(self) -> None:
        # HeadBucket: the endpoint answers, the credentials are accepted, the bucket exists.
        client = await self._client()
        with _failures(f"HeadBucket of {self.bucket!r}"):
            await self._check_bucket(client)

    # -- keys ----------------------------------------------------------------
    @staticmethod
    def _blob_key(digest: str) -> str:
        return "blobs/sha256/" + check_digest(digest).split(":", 1)[1]

    @staticmethod
    def _record_key(kind: str, key: str) -> str:
        return f"records/{check_record_key(kind)}/{check_record_key(key)}.json"

    # -- blobs ---------------------------------------------------------------
    async def blob_info(self, digest: str) -> BlobInfo | None:
        key = self._blob_key(digest)
        client = await self._client()
        with _failures(f"HEAD {key}"):
            try:
                head = await client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_not_found(exc):
                    return None
                raise
        return BlobInfo(digest, int(head["ContentLength"]))

    async def read_blob(
        self, digest: str, offset: int = 0, length: int | None = None, chunk_size: int = 1 << 20
    ) -> AsyncIterator[bytes]:
        key = self._blob_key(digest)
        if offset < 0 or (length is not None and length < 0) or chunk_size < 1:
            raise ValueError(f"invalid range: offset={offset} length={length} chunk_size={chunk_size}")
        if length == 0:
            # No bytes to fetch, but a missing blob must still be an error.
            if await self.blob_info(digest) is None:
                raise KeyError(digest)
            return
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            params["Range"] = f"bytes={offset}-{end}"
        client = await self._client()
        with _failures(f"GET {key}"):
            try:
                response = await client.get_object(**params)
            except ClientError as exc:
                if _is_not_found(exc):
                    raise KeyError(digest) from None
                if _error_code(exc) == "InvalidRange":
                    return  # offset at or past the end: no bytes, like reading past EOF
                raise
            body = response["Body"]
            try:
                async for chunk in body.iter_chunks(chunk_size):
                    yield chunk
            finally:
                body.close()

    async def put_blob_file(self, digest: str, path: Path) -> None:
        key = self._blob_key(digest)
        path = Path(path)
        try:
            if await self.blob_info(digest) is None:
                try:
                    size = (await asyncio.to_thread(path.stat)).st_size
                    if size > PART_SIZE:
                        await self._put_multipart(key, path, size)
                    else:
                        # At most one part's worth, the same memory bound as a multipart upload.
                        await self._put_object(key, await asyncio.to_thread(path.read_bytes), digest)
                except OSError as exc:
                    reason = os_error_text(exc)
                    raise StorageError(f"cannot read blob {digest} to store it: {reason}", exc.errno) from exc
        finally:
            # The file is consumed either way: a failed upload must not leave it in the
            # work directory (the Store contract).
            path.unlink(missing_ok=True)

    async def _put_object(self, key: str, data: bytes, digest: str | None = None) -> None:
        extra: dict[str, Any] = {}
        if digest is not None:
            # S3 checks the body against this and rejects a mismatch: the blob's own
            # digest then guards the transfer end to end.
            extra["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(digest.split(":", 1)[1])).decode()
        client = await self._client()
        with _failures(f"PUT {key}"):
            await client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)

    async def _put_multipart(self, key: str, path: Path, size: int) -> None:
        part_size = max(PART_SIZE, -(-size // MAX_PARTS))
        client = await self._client()
        with _failures(f"multipart upload of {key}"):
            upload = await client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType="application/octet-stream"
            )
            upload_id = upload["UploadId"]
            try:
                parts = []
                handle: BinaryIO
                with await asyncio.to_thread(open, path, "rb") as handle:
                    for number, offset in enumerate(range(0, size, part_size), start=1):
                        data = await asyncio.to_thread(handle.read, part_size)
                        if len(data) != min(part_size, size - offset):
                            raise StorageError(f"{path.name} changed while it was being stored")
                        part = await client.upload_part(
                            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                        )
                        parts.append({"PartNumber": number, "ETag": part["ETag"]})
                await client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
            except BaseException:
                # Parts of an abandoned upload are billed until aborted; shielded so that
                # a cancelled build still cleans up.
                with contextlib.suppress(Exception):
                    await asyncio.shield(
                        client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                    )
                raise

    async def _put_small_blob(self, digest: str, data: bytes) -> None:
        if await self.blob_info(digest) is None:
            await self._put_object(self._blob_key(digest), data, digest)

    async def blob_redirect_url(self, digest: str) -> str | None:
        if not self.config.redirect:
            return None
        key = self._blob_key(digest)
        client = await self._client()
        with _failures(f"presigning {key}"):
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=REDIRECT_EXPIRY
            )
        return url

    async def remove_blob(self, digest: str) -> None:
        self.removal_generation += 1
        key = self._blob_key(digest)
        client = await self._client()
        with _failures(f"DELETE {key}"):
            await client.delete_object(Bucket=self.bucket, Key=key)

    async def list_blob_entries(self) -> AsyncIterator[Listed]:
        client = await self._client()
        with _failures("LIST blobs/sha256/"):
            async for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix="blobs/sha256/"
            ):
                for entry in page.get("Contents", []):
                    digest = "sha256:" + entry["Key"].rsplit("/", 1)[-1]
                    if is_digest(digest):
                        yield Listed(digest, entry["LastModified"].timestamp(), int(entry["Size"]))

    async def clean_staging(self, max_age: float) -> int:
        """Abort multipart uploads that a killed replica left open (they are billed).

        Uploads started less than `max_age` ago may belong to a live replica and stay.
        """
        client = await self._client()
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=max_age)
        aborted = 0
        with _failures("listing multipart uploads"):
            async for page in client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix="blobs/"
            ):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"] < cutoff:
                        await client.abort_multipart_upload(
                            Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted += 1
        return aborted

    # -- records -------------------------------------------------------------
    async def get_record(self, kind: str, key: str) -> dict[str, Any] | None:
        object_key = self._record_key(kind, key)
        client = await self._client()
        with _failures(f"GET {object_key}"):
            try:
                response = await client.get_object(Bucket=self.bucket, Key=object_key)
            except ClientError as exc:
                if _is_not_found(exc):
                    return None
                raise
            async with response["Body"] as body:
                data = await body.read()
        value = json_object(data)
        if value is None:
            raise StorageError(f"record {object_key} is not a JSON object")
        return value

    async def put_record(self, kind: str, key: str, value: dict[str, Any]) -> None:
        object_key = self._record_key(kind, key)
        data = json.dumps(value, sort_keys=True).encode()
        client = await self._client()
        with _failures(f"PUT {object_key}"):
            await client.put_object(
                Bucket=self.bucket, Key=object_key, Body=data, ContentType="application/json"
            )

    async def list_records(self, kind: str, prefix: str = "") -> list[str]:
        base = f"records/{check_record_key(kind)}/"
        client = await self._client()
        keys = []
        with _failures(f"LIST {base}{prefix}"):
            async for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            ):
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(base):]
                    if name.endswith(".json"):
                        keys.append(name[: -len(".json")])
        # S3 lists in key order, but with ".json" stripped the order may differ ("a-b" vs "a").
        return sorted(keys)

    async def list_record_entries(self, kind: str) -> list[Listed]:
        base = f"records/{check_record_key(kind)}/"
        client = await self._client()
        found = []
        with _failures(f"LIST {base}"):
            async for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(base):]
                    if name.endswith(".json"):
                        found.append(Listed(name[: -len(".json")], entry["LastModified"].timestamp(), int(entry["Size"])))
        return found

    async def remove_record(self, kind: str, key: str) -> None:
        object_key = self._record_key(kind, key)
        client = await self._client()
        with _failures(f"DELETE {object_key}"):
            await client.delete_object(Bucket=self.bucket, Key=object_key)
