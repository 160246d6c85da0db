"""The Store contract, run against both backends: the filesystem and S3 (a real SeaweedFS)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from condery.config import StorageConfig
from condery.storage import StorageError, Store, open_store
from condery.storage.filesystem import FilesystemStore
from condery.storage.s3 import PART_SIZE, S3Store
from tests.fixtures.seaweed import SeaweedS3

BAD_DIGESTS = ["sha256:abc", "sha512:" + "0" * 128, "sha256:" + "A" * 64, "sha256:" + "0" * 64 + "\n", "../etc/passwd"]
BAD_KEYS = ["", "/a", "a/", "a//b", "..", "a/../b", "./a", "a b", "a\nb", "a?b", "ä"]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unique_kind() -> str:
    # One bucket serves the whole session, so each test lists records of its own kind.
    return "kind-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def s3_bucket(seaweed: SeaweedS3) -> str:
    return seaweed.create_bucket()


def s3_config(seaweed: SeaweedS3, bucket: str, redirect: bool = False) -> StorageConfig:
    # No region: the default chain (none configured in tests) must still work.
    return StorageConfig(backend="s3", bucket=bucket, endpoint_url=seaweed.endpoint_url, redirect=redirect)


@pytest.fixture(params=["filesystem", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "filesystem":
        opened: Store = open_store(StorageConfig(backend="filesystem", path=str(tmp_path / "store")))
    else:
        server: SeaweedS3 = request.getfixturevalue("seaweed")
        opened = open_store(s3_config(server, request.getfixturevalue("s3_bucket")))
    yield opened
    await opened.close()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: bytes = response.read()
        return data


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def read_all(store: Store, digest: str, offset: int = 0, length: int | None = None, chunk: int = 1000) -> bytes:
    chunks = [c async for c in store.read_blob(digest, offset, length, chunk_size=chunk)]
    assert all(0 < len(c) <= chunk for c in chunks)
    return b"".join(chunks)


# -- blobs -----------------------------------------------------------------------------


async def test_put_file_then_read_back(store: Store, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = digest_of(data)
    source = write(tmp_path / "layer", data)
    assert await store.blob_info(digest) is None
    await store.put_blob_file(digest, source)
    assert not source.exists()  # the store took the file
    info = await store.blob_info(digest)
    assert info is not None and (info.digest, info.size) == (digest, len(data))
    assert await store.get_blob_bytes(digest) == data
    assert await read_all(store, digest, chunk=64 * 1024) == data


async def test_small_blob_bytes(store: Store) -> None:
    data = json.dumps({"config": uuid.uuid4().hex}).encode()
    digest = digest_of(data)
    await store.put_blob_bytes(digest, data)
    assert await store.get_blob_bytes(digest) == data
    empty = b""
    await store.put_blob_bytes(digest_of(empty), empty)
    assert await store.get_blob_bytes(digest_of(empty)) == b""
    info = await store.blob_info(digest_of(empty))
    assert info is not None and info.size == 0


RANGES = [
    (0, None),
    (1, None),
    (999, 2),  # across the first chunk boundary
    (1000, 1000),  # exactly one chunk
    (500, 3000),  # several chunks, unaligned at both ends
    (9999, None),  # the last byte
    (9990, 100),  # a length past the end is cut at the end
    (0, 0),
    (10_000, None),  # at the end: nothing
    (12_345, 10),  # past the end: nothing
]


@pytest.mark.parametrize(("offset", "length"), RANGES)
async def test_ranged_reads(store: Store, offset: int, length: int | None) -> None:
    data = os.urandom(10_000)
    digest = digest_of(data)
    await store.put_blob_bytes(digest, data)
    expected = data[offset:] if length is None else data[offset : offset + length]
    assert await read_all(store, digest, offset, length, chunk=1000) == expected


async def test_missing_blob(store: Store) -> None:
    digest = digest_of(uuid.uuid4().bytes)
    assert await store.blob_info(digest) is None
    with pytest.raises(KeyError):
        await store.get_blob_bytes(digest)
    with pytest.raises(KeyError):
        await read_all(store, digest, 10, 5)
    with pytest.raises(KeyError):
        await read_all(store, digest, 0, 0)


async def test_put_of_stored_digest_is_a_noop(store: Store, tmp_path: Path) -> None:
    data = os.urandom(4096)
    digest = digest_of(data)
    await store.put_blob_bytes(digest, data)
    # Content addressing: a second put under the same digest must not touch the stored
    # bytes (different bytes here only to make an overwrite visible), and still takes the file.
    other = write(tmp_path / "other", b"different bytes")
    await store.put_blob_file(digest, other)
    assert not other.exists()
    await store.put_blob_bytes(digest, b"more different bytes")
    assert await store.get_blob_bytes(digest) == data


async def test_large_blob(store: Store, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    data = os.urandom(20 * 1024 * 1024 + 3)
    digest = digest_of(data)
    await store.put_blob_file(digest, write(tmp_path / "big", data))
    info = await store.blob_info(digest)
    assert info is not None and info.size == len(data)
    hasher = hashlib.sha256()
    async for chunk in store.read_blob(digest):
        hasher.update(chunk)
    assert "sha256:" + hasher.hexdigest() == digest
    # A range that straddles the 8 MiB part boundary of the S3 upload.
    assert await read_all(store, digest, PART_SIZE - 5, 10, chunk=3) == data[PART_SIZE - 5 : PART_SIZE + 5]
    if isinstance(store, S3Store):
        head = request.getfixturevalue("seaweed").client().head_object(Bucket=store.bucket, Key=store._blob_key(digest))
        assert head["ETag"].strip('"').endswith("-3")  # three parts: 8 + 8 + 4 MiB


@pytest.mark.parametrize("bad", BAD_DIGESTS)
async def test_invalid_digests_are_rejected(store: Store, bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        await store.blob_info(bad)
    with pytest.raises(ValueError):
        await read_all(store, bad)
    with pytest.raises(ValueError):
        await store.put_blob_bytes(bad, b"x")
    source = write(tmp_path / "x", b"x")
    with pytest.raises(ValueError):
        await store.put_blob_file(bad, source)
    assert await store.blob_redirect_url(digest_of(b"x")) is None  # no redirects unless configured


# -- records ---------------------------------------------------------------------------


async def test_records_round_trip(store: Store) -> None:
    kind = unique_kind()
    key = "conda-forge/linux-64/python-3.11.7=h1:0+x,y@z"
    assert await store.get_record(kind, key) is None
    value = {"b": [1, 2, {"c": None}], "a": "ü", "digest": digest_of(b"x")}
    await store.put_record(kind, key, value)
    assert await store.get_record(kind, key) == value
    await store.put_record(kind, key, {"replaced": True})  # last writer wins
    assert await store.get_record(kind, key) == {"replaced": True}
    assert await store.get_record(unique_kind(), key) is None


async def test_list_records(store: Store) -> None:
    kind, other = unique_kind(), unique_kind()
    keys = ["a", "a-b", "a/b/c", "a/b/d", "ab", "b:1+x"]
    for key in reversed(keys):
        await store.put_record(kind, key, {"key": key})
    await store.put_record(other, "a", {})
    assert await store.list_records(kind) == sorted(keys)
    assert await store.list_records(kind, "a") == ["a", "a-b", "a/b/c", "a/b/d", "ab"]
    assert await store.list_records(kind, "a/") == ["a/b/c", "a/b/d"]
    assert await store.list_records(kind, "a/b/c") == ["a/b/c"]
    assert await store.list_records(kind, "zzz") == []
    assert await store.list_records(unique_kind()) == []


@pytest.mark.parametrize("bad", BAD_KEYS)
async def test_invalid_record_keys_are_rejected(store: Store, bad: str) -> None:
    with pytest.raises(ValueError):
        await store.get_record("kind", bad)
    with pytest.raises(ValueError):
        await store.put_record("kind", bad, {})
    with pytest.raises(ValueError):
        await store.get_record(bad, "key")
    with pytest.raises(ValueError):
        await store.list_records(bad)


# -- S3 only ---------------------------------------------------------------------------


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


# -- filesystem only -------------------------------------------------------------------


@pytest.fixture
def other_device_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than tmp_path, so moves become copies."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) to copy across")
    path = Path(tempfile.mkdtemp(dir=shm, prefix="condery-test-"))
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def blob_files(store: FilesystemStore) -> list[Path]:
    return list((store.root / "blobs" / "sha256").iterdir())


async def test_filesystem_writes_go_through_tmp(tmp_path: Path, other_device_dir: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    data = os.urandom(1 << 20)
    # With tmp/ unusable, every write that copies bytes must fail before anything
    # appears under blobs/ or records/: nothing is written in place.
    (store.root / "tmp").rmdir()
    (store.root / "tmp").write_bytes(b"not a directory")
    with pytest.raises(StorageError):
        await store.put_blob_bytes(digest_of(data), data)
    source = write(other_device_dir / "layer", data)
    with pytest.raises(StorageError):
        await store.put_blob_file(digest_of(data), source)
    with pytest.raises(StorageError):
        await store.put_record("kind", "key", {})
    assert blob_files(store) == []
    assert not (store.root / "records" / "kind" / "key.json").exists()


async def test_filesystem_never_shows_a_partial_blob(tmp_path: Path, other_device_dir: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    data = os.urandom(64 << 20)
    digest = digest_of(data)
    source = write(other_device_dir / "layer", data)
    seen_sizes: set[int] = set()
    scans = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal scans
        blobs = store.root / "blobs" / "sha256"
        while not done.is_set():
            scans += 1
            for entry in os.scandir(blobs):
                try:
                    seen_sizes.add(entry.stat().st_size)
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        await store.put_blob_file(digest, source)  # a copy across filesystems, not a rename
    finally:
        done.set()
        watcher.join()
    assert scans > 10  # the watcher did look while the copy ran
    assert seen_sizes <= {len(data)}
    assert not source.exists()
    assert list((store.root / "tmp").iterdir()) == []
    assert await store.get_blob_bytes(digest) == data
