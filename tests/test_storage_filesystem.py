"""The filesystem store: the Store contract (tests/storage_contract.py), then its own cases:
staging through tmp/, a full disk, corruption found on first read, crash litter."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from condery.config import StorageConfig
from condery.storage import StorageError, Store, store_fault_reason
from condery.storage.backends import open_store
from condery.storage.filesystem import FilesystemStore
from condery.storage.litter import remove_stale, stale_age
from tests.fixtures.disk import fill, tmpfs
from tests.storage_contract import Plant, StoreContract, age, digest_of, read_all, write


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(StorageConfig(backend="filesystem", path=str(tmp_path / "store")))
    assert isinstance(opened, FilesystemStore)
    yield opened
    await opened.close()


def blob_path(store: FilesystemStore, digest: str) -> Path:
    return store.root / "blobs" / "sha256" / digest.split(":", 1)[1]


def plant_file(store: FilesystemStore, digest: str, data: bytes) -> None:
    """Put `data` under `digest` behind the store's back, as rot or a bad copy would."""
    blob_path(store, digest).write_bytes(data)


@pytest.fixture
def plant(store: FilesystemStore) -> Plant:
    return lambda digest, data: plant_file(store, digest, data)


class TestFilesystemStore(StoreContract):
    local_files = True


# -- writes go through tmp/ --------------------------------------------------------------


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


# -- disk full -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (the tests run as root), to run out of space for real."""
    with tmpfs(tmp_path / "small", "1m") as mnt:
        yield mnt


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
    filler = fill(small_disk)
    with pytest.raises(StorageError) as caught:
        await store.put_record("layers", "some/key", {"digest": digest})
    assert str(caught.value) == "cannot store record layers/some/key: no space left on device"
    assert list(store.tmp.iterdir()) == []
    assert store_fault_reason(caught.value) == "the store is out of space"

    filler.unlink()
    small = os.urandom(1000)
    await store.put_blob_bytes(digest_of(small), small)  # works again once there is room
    assert await store.get_blob_bytes(digest_of(small)) == small


# -- corruption: found on first read ----------------------------------------------------


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
    plant_file(store, digest, b"rot")
    await store.put_blob_file(digest, write(tmp_path / "layer", data))
    assert await store.verify_blob(digest) is True


async def test_filesystem_corrupt_record_is_a_store_error(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "store")
    await store.put_record("images", "n/_/latest/x", {"a": 1})
    (path,) = (tmp_path / "store").rglob("x.json")
    path.write_text("{not json")
    with pytest.raises(StorageError):
        await store.get_record("images", "n/_/latest/x")


def test_json_object_refuses_hostile_nesting_without_raising() -> None:
    """Records, manifests and auth files are read with json_object: None, not a crash."""
    from condery.common.jsonobject import json_object

    assert json_object(b"[" * 200_000) is None
    assert json_object(b"\xff\xfe") is None and json_object("[1]") is None
    assert json_object('{"a": 1}') == {"a": 1}


# -- crash litter ----------------------------------------------------------------------


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
