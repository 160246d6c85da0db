"""The S3 store on a real SeaweedFS: the Store contract (tests/storage_contract.py), then
its own cases: multipart uploads, presigned redirects, a missing bucket or endpoint,
S3's own digest check, aborted uploads, the local work directory."""

from __future__ import annotations

import asyncio
import os
import tempfile
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from condery.config import StorageConfig
from condery.storage import StorageError, Store
from condery.storage.backends import open_store
from condery.storage.s3 import PART_SIZE, S3Store
from tests.fixtures.seaweed import SeaweedS3
from tests.storage_contract import Plant, StoreContract, digest_of, unique_kind, write


@pytest.fixture(scope="session")
def s3_bucket(seaweed: SeaweedS3) -> str:
    return seaweed.create_bucket()


def s3_config(seaweed: SeaweedS3, bucket: str, redirect: bool = False) -> StorageConfig:
    # No region: the default chain (none configured in tests) must still work.
    return StorageConfig(backend="s3", bucket=bucket, endpoint_url=seaweed.endpoint_url, redirect=redirect)


@pytest.fixture
async def store(seaweed: SeaweedS3, s3_bucket: str) -> AsyncIterator[Store]:
    # One bucket for the session: the contract's cases use fresh digests and kinds.
    opened = open_store(s3_config(seaweed, s3_bucket))
    assert isinstance(opened, S3Store)
    yield opened
    await opened.close()


@pytest.fixture
def plant(store: S3Store, seaweed: SeaweedS3) -> Plant:
    """Put bytes under a digest behind the store's back, with a client of the test's own."""
    client = seaweed.client()

    def plant(digest: str, data: bytes) -> None:
        client.put_object(Bucket=store.bucket, Key=store._blob_key(digest), Body=data)

    return plant


class TestS3Store(StoreContract):
    local_files = False
    part_size = PART_SIZE


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
        return data


async def test_s3_large_blob_is_a_multipart_upload(store: S3Store, seaweed: SeaweedS3, tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024 + 3)
    digest = digest_of(data)
    await store.put_blob_file(digest, write(tmp_path / "big", data))
    head = seaweed.client().head_object(Bucket=store.bucket, Key=store._blob_key(digest))
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 8 + 8 + 4 MiB
    assert int(head["ContentLength"]) == len(data)


async def test_s3_presigned_redirect_downloads_the_blob(seaweed: SeaweedS3, s3_bucket: str) -> None:
    store = S3Store(s3_config(seaweed, s3_bucket, redirect=True))
    try:
        data = os.urandom(100_000)
        digest = digest_of(data)
        await store.put_blob_bytes(digest, data)
        url = await store.blob_redirect_url(digest)
        assert url is not None and url.startswith(seaweed.endpoint_url + "/")
        # A plain GET with no credentials of its own, as a registry client would make.
        assert await asyncio.to_thread(fetch, url) == data
    finally:
        await store.close()


async def test_s3_records_are_sorted_json(seaweed: SeaweedS3, s3_bucket: str) -> None:
    store = S3Store(s3_config(seaweed, s3_bucket))
    try:
        kind = unique_kind()
        await store.put_record(kind, "k", {"z": 1, "a": {"y": 2, "b": 3}})
        raw = seaweed.client().get_object(Bucket=s3_bucket, Key=f"records/{kind}/k.json")["Body"].read()
        assert raw == b'{"a": {"b": 3, "y": 2}, "z": 1}'
    finally:
        await store.close()


async def test_s3_missing_bucket_is_a_clear_error(seaweed: SeaweedS3) -> None:
    store = S3Store(s3_config(seaweed, "condery-no-such-bucket"))
    try:
        with pytest.raises(StorageError, match="condery-no-such-bucket.*does not exist"):
            await store.blob_info(digest_of(b"x"))
    finally:
        await store.close()


async def test_s3_ping_of_a_missing_bucket_says_so(seaweed: SeaweedS3) -> None:
    store = S3Store(s3_config(seaweed, "condery-no-such-bucket"))
    try:
        with pytest.raises(StorageError, match="condery-no-such-bucket.*does not exist"):
            await store.ping()
    finally:
        await store.close()


async def test_s3_unreachable_endpoint_is_a_storage_error(seaweed: SeaweedS3) -> None:
    from tests.fixtures.procs import free_port

    store = S3Store(StorageConfig(backend="s3", bucket="any-bucket", endpoint_url=f"http://127.0.0.1:{free_port()}"))
    try:
        with pytest.raises(StorageError) as caught:
            await store.get_record("kind", "key")
        assert "condery-test-secret" not in str(caught.value)
    finally:
        await store.close()


async def test_s3_rejects_content_that_does_not_match_its_digest(
    seaweed: SeaweedS3, s3_bucket: str
) -> None:
    store = S3Store(s3_config(seaweed, s3_bucket))
    try:
        digest = digest_of(uuid.uuid4().bytes)
        with pytest.raises(StorageError):
            await store.put_blob_bytes(digest, b"not the bytes of that digest")
        assert await store.blob_info(digest) is None
    finally:
        await store.close()


# -- crash litter ----------------------------------------------------------------------


async def test_s3_clean_staging_aborts_only_stale_multipart_uploads(seaweed: SeaweedS3, s3_bucket: str) -> None:
    store = S3Store(s3_config(seaweed, s3_bucket))
    client = seaweed.client()
    key = "blobs/sha256/" + "f" * 64
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]

    def open_uploads() -> set[str]:
        listed = client.list_multipart_uploads(Bucket=s3_bucket, Prefix="blobs/")
        return {u["UploadId"] for u in listed.get("Uploads", [])}

    try:
        assert upload in open_uploads()
        await store.clean_staging(3600)  # just started: may be a live replica's
        assert upload in open_uploads()
        await asyncio.sleep(1.1)
        assert await store.clean_staging(1) >= 1
        assert upload not in open_uploads()
    finally:
        await store.close()


async def test_s3_work_directory_is_removed_on_close_and_orphans_at_start(
    seaweed: SeaweedS3, s3_bucket: str, tmp_path: Path
) -> None:
    from condery.build.state import WORK_DIR_PREFIX, AppState
    from condery.config import Config

    # A work directory left by a process that is gone (pid 2**22+1 is above Linux's pid_max).
    orphan = Path(tempfile.gettempdir()) / f"{WORK_DIR_PREFIX}{2**22 + 1}-test"
    (orphan / "stage").mkdir(parents=True, exist_ok=True)
    config = Config(storage=s3_config(seaweed, s3_bucket), package_cache=str(tmp_path / "pkgs"))
    state = await AppState.open(config)
    try:
        assert not orphan.exists()
        assert state.work_dir.is_dir() and state.work_dir.name.startswith(f"{WORK_DIR_PREFIX}{os.getpid()}-")
        write(state.work_dir / "leftover.tar.gz", b"x")
    finally:
        await state.close()
    assert not state.work_dir.exists()
