"""The Store contract, run against both backends: the filesystem and S3 (a real SeaweedFS)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from condery.config import StorageConfig
from condery.storage import StorageError, Store, open_store, store_fault_reason
from condery.storage.filesystem import FilesystemStore
from condery.storage.litter import remove_stale, stale_age
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


async def test_ping_answers_when_the_store_takes_writes(store: Store) -> None:
    await store.ping()
    await store.ping()  # nothing left behind that a second probe would trip over


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


# -- integrity and crash litter (both backends) -----------------------------------------


def plant(store: Store, digest: str, data: bytes, request: pytest.FixtureRequest) -> None:
    """Put `data` under `digest` behind the store's back, as rot or a bad copy would."""
    if isinstance(store, FilesystemStore):
        (store.root / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        client = request.getfixturevalue("seaweed").client()
        client.put_object(Bucket=store.bucket, Key=store._blob_key(digest), Body=data)


async def test_verify_list_and_remove_blobs(store: Store, request: pytest.FixtureRequest) -> None:
    good = os.urandom(5000)
    await store.put_blob_bytes(digest_of(good), good)
    bad_digest = digest_of(b"the real bytes")
    plant(store, bad_digest, b"the real byte", request)  # one byte short

    listed = {d async for d in store.list_blobs()}
    assert {digest_of(good), bad_digest} <= listed
    assert await store.verify_blob(digest_of(good)) is True
    assert await store.verify_blob(bad_digest) is False
    with pytest.raises(KeyError):
        await store.verify_blob(digest_of(uuid.uuid4().bytes))

    await store.remove_blob(bad_digest)
    await store.remove_blob(bad_digest)  # absent: a no-op
    assert await store.blob_info(bad_digest) is None
    assert bad_digest not in {d async for d in store.list_blobs()}


async def test_entries_with_times_and_sizes_and_record_removal(store: Store) -> None:
    """What gc lists and removes: blobs and records with their write time and size."""
    data = b"gc entry"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = time.time() - 5  # S3 times are whole seconds
    await store.put_blob_bytes(digest, data)
    await store.put_record("gc-test", "a/b", {"x": 1})
    entries = {e.name: e async for e in store.list_blob_entries()}
    assert entries[digest].size == len(data) and started <= entries[digest].modified <= time.time() + 5
    records = await store.list_record_entries("gc-test")
    assert [r.name for r in records] == ["a/b"] and records[0].size > 0 and records[0].modified >= started
    await store.remove_record("gc-test", "a/b")
    await store.remove_record("gc-test", "a/b")  # absent: a no-op
    assert await store.get_record("gc-test", "a/b") is None
    assert await store.list_record_entries("gc-test") == []
    assert await store.list_record_entries("gc-never-written") == []


async def test_failed_put_names_the_blob_not_the_path(store: Store, tmp_path: Path) -> None:
    # Storage errors reach clients (503 UNAVAILABLE): no server path in them.
    missing = digest_of(b"nothing")
    source = tmp_path / "vanishing"
    with pytest.raises(StorageError) as caught:
        await store.put_blob_file(missing, source)  # the file does not exist
    assert str(tmp_path) not in str(caught.value)
    assert missing in str(caught.value)


# -- filesystem: disk full, corruption on first read, crash litter ----------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root), to run out of space for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_filesystem_disk_full_leaves_no_temp_file(small_disk: Path, other_device_dir: Path) -> None:
    store = FilesystemStore(small_disk / "store")
    big = os.urandom(2 << 20)  # more than the disk holds
    digest = digest_of(big)

    with pytest.raises(StorageError) as caught:
        await store.put_blob_bytes(digest, big)
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == f"cannot store blob {digest}: no space left on device"
    assert list(store.tmp.iterdir()) == [] and blob_files(store) == []

    source = write(other_device_dir / "layer", big)  # copied in across filesystems
    with pytest.raises(StorageError) as caught:
        await store.put_blob_file(digest, source)
    assert caught.value.errno == errno.ENOSPC and str(small_disk) not in str(caught.value)
    assert list(store.tmp.iterdir()) == [] and blob_files(store) == []
    assert not source.exists()

    # Full to the last block: even a record cannot be written, and leaves nothing.
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb", buffering=0) as filler:
        while True:
            filler.write(b"\0" * 4096)
    with pytest.raises(StorageError) as caught:
        await store.put_record("layers", "some/key", {"digest": digest})
    assert str(caught.value) == "cannot store record layers/some/key: no space left on device"
    assert list(store.tmp.iterdir()) == []
    assert store_fault_reason(caught.value) == "the store is out of space"

    (small_disk / "filler").unlink()
    small = os.urandom(1000)
    await store.put_blob_bytes(digest_of(small), small)  # works again once there is room
    assert await store.get_blob_bytes(digest_of(small)) == small


async def test_filesystem_corrupt_blob_is_dropped_on_first_read(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)
    await FilesystemStore(tmp_path / "store").put_blob_bytes(digest, data)
    path = tmp_path / "store" / "blobs" / "sha256" / digest.split(":", 1)[1]
    with open(path, "r+b") as handle:
        handle.truncate(len(data) // 2)

    restarted = FilesystemStore(tmp_path / "store")  # a new process trusts nothing it did not write
    with pytest.raises(KeyError):
        await read_all(restarted, digest, 10, 5)  # a range too: hashed whole first
    assert not path.exists() and await restarted.blob_info(digest) is None

    # Rebuilt (the builder re-puts it): served again, and good blobs are read as usual.
    await restarted.put_blob_file(digest, write(tmp_path / "rebuilt", data))
    assert await FilesystemStore(tmp_path / "store").get_blob_bytes(digest) == data



async def test_open_blob_file_for_sendfile(store: Store, tmp_path: Path) -> None:
    """The server sends a filesystem blob with sendfile from this file; S3 has none."""
    data = os.urandom(2 * 1024 * 1024 + 5)
    digest = digest_of(data)
    await store.put_blob_file(digest, write(tmp_path / "layer", data))
    handle = await store.open_blob_file(digest)
    if isinstance(store, FilesystemStore):
        assert handle is not None
        with handle:
            assert handle.read() == data
        with pytest.raises(KeyError):
            await store.open_blob_file(digest_of(uuid.uuid4().bytes))
    else:
        assert handle is None  # S3: streamed (or redirected) instead


async def test_filesystem_open_blob_file_checks_a_corrupt_blob_first(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)
    await FilesystemStore(tmp_path / "store").put_blob_bytes(digest, data)
    path = tmp_path / "store" / "blobs" / "sha256" / digest.split(":", 1)[1]
    with open(path, "r+b") as handle:
        handle.truncate(len(data) // 2)
    with pytest.raises(KeyError):
        await FilesystemStore(tmp_path / "store").open_blob_file(digest)
    assert not path.exists()

async def test_filesystem_rebuilt_blob_replaces_an_unchecked_corrupt_copy(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    digest = digest_of(data)
    store = FilesystemStore(tmp_path / "store")
    plant(store, digest, b"rot", None)  # type: ignore[arg-type]
    await store.put_blob_file(digest, write(tmp_path / "layer", data))
    assert await store.verify_blob(digest) is True


def age(path: Path, seconds: float) -> None:
    """Set the mtime of `path` and everything under it `seconds` into the past."""
    when = time.time() - seconds
    entries = [path]
    if path.is_dir() and not path.is_symlink():
        # os.walk never follows symlinks (rglob's is_dir() does) and skips what vanished.
        for dirpath, dirnames, filenames in os.walk(path):
            entries += [Path(dirpath, name) for name in (*dirnames, *filenames)]
    for entry in entries:
        os.utime(entry, (when, when), follow_symlinks=False)


async def test_filesystem_clean_staging_removes_only_stale_entries(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    stale_dir = store.tmp / ".stage-python-abc"
    (stale_dir / "prefix" / "lib").mkdir(parents=True)
    (stale_dir / "prefix" / "lib" / "libpython.so").write_bytes(b"x" * 1000)
    stale_file = write(store.tmp / "xz-5.2.5-abc.tar.gz", b"partial")
    age(stale_dir, 7200)
    age(stale_file, 7200)
    # Another replica's live build: an old directory with one freshly written file deep inside.
    live_dir = store.tmp / ".stage-numpy-def"
    (live_dir / "prefix" / "lib").mkdir(parents=True)
    write(live_dir / "prefix" / "lib" / "old.so", b"y")
    age(live_dir, 7200)
    write(live_dir / "prefix" / "lib" / "new.so", b"z")
    os.utime(live_dir / "prefix" / "lib", (time.time() - 7200,) * 2)
    fresh_file = write(store.tmp / "w-fresh", b"being written")

    assert await store.clean_staging(3600) == 2
    assert sorted(p.name for p in store.tmp.iterdir()) == [".stage-numpy-def", "w-fresh"]
    assert fresh_file.exists() and (live_dir / "prefix" / "lib" / "new.so").exists()


def test_remove_stale_matches_partial_downloads_only(tmp_path: Path) -> None:
    archives = tmp_path / "pkgs" / "archives" / ("a" * 64)
    archives.mkdir(parents=True)
    partial = write(archives / ".download-x1", b"half")
    package = write(archives / "xz-5.2.5-h7b6447c_0.conda", b"whole")
    age(partial, 7200)
    age(package, 7200)
    assert remove_stale(tmp_path / "pkgs", 3600, "archives/*/.download-*") == 1
    assert not partial.exists() and package.exists()
    assert stale_age(1800) == 3600 and stale_age(7200) == 14400


# -- S3: crash litter ------------------------------------------------------------------


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
    from condery.config import Config
    from condery.build.state import WORK_DIR_PREFIX, AppState

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


def test_json_object_refuses_hostile_nesting_without_raising() -> None:
    """Records, manifests and auth files are read with json_object: None, not a crash."""
    from condery.common.jsonobject import json_object

    assert json_object(b"[" * 200_000) is None
    assert json_object(b"\xff\xfe") is None and json_object("[1]") is None
    assert json_object('{"a": 1}') == {"a": 1}


async def test_filesystem_corrupt_record_is_a_store_error(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    await store.put_record("images", "n/_/latest/x", {"a": 1})
    (path,) = (tmp_path / "store").rglob("x.json")
    path.write_text("{not json")
    with pytest.raises(StorageError):
        await store.get_record("images", "n/_/latest/x")
