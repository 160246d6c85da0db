"""tags/list from an index record per name (issue 8): written by put_image, merged by
concurrent writers, built once from a scan on stores written before it existed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from condery.records.cache import RecordCache
from condery.records.kinds import TAGS as TAGS_KIND
from condery.records.schemas import ImageRecord, TagsIndex
from condery.records.keys import image_record_key
from condery.config import StorageConfig
from condery.image.names import ImageRef, parse_name
from condery.storage import Store
from condery.storage.backends import open_store
from tests.fixtures.seaweed import SeaweedS3
from tests.test_e2e import OCI_MANIFEST, condery

NUMPY = parse_name("numpy", {})
REF = ImageRef("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json",
               "sha256:" + "b" * 64, "application/vnd.docker.distribution.manifest.v2+json")


def record() -> ImageRecord:
    return ImageRecord(REF, 1.0, {"linux/amd64": {"oci": REF.oci_digest}})


# Not test_storage.py's `store`: that shares one bucket per module, these tests need an empty one.
@pytest.fixture(params=["filesystem", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "filesystem":
        opened: Store = open_store(StorageConfig(backend="filesystem", path=str(tmp_path / "store")))
    else:
        server: SeaweedS3 = request.getfixturevalue("seaweed")
        opened = open_store(StorageConfig(backend="s3", bucket=server.create_bucket(), endpoint_url=server.endpoint_url))
    yield opened
    await opened.close()


async def test_put_image_indexes_its_tag_and_tags_reads_only_the_index(store: Store) -> None:
    cache = RecordCache(store)
    await cache.put_image(image_record_key(NUMPY, "latest", "f" * 32), record())
    await cache.put_image(image_record_key(NUMPY, "2024-06-01", "f" * 32), record())
    index = TagsIndex.from_record(await store.get_record(TAGS_KIND, "numpy"))
    assert index is not None and set(index.tags) == {"latest", "2024-06-01"}
    assert all(at > 1e9 for at in index.tags.values())  # when each was last written
    # An image record written behind the index's back is not listed: tags reads no scan.
    await store.put_record("images", image_record_key(NUMPY, "2023-01-01", "f" * 32), record().as_record())
    assert await cache.tags(NUMPY) == {"latest", "2024-06-01"}
    # Other names have their own index; "numpy/scipy" is not a tag of "numpy".
    await cache.put_image(image_record_key(parse_name("numpy/scipy", {}), "latest", "e" * 32), record())
    assert await cache.tags(NUMPY) == {"latest", "2024-06-01"}
    assert await cache.tags(parse_name("numpy/scipy", {})) == {"latest"}


async def test_a_store_without_index_is_scanned_once_and_indexed(store: Store) -> None:
    for tag in ("latest", "2024-06-01"):
        await store.put_record("images", image_record_key(NUMPY, tag, "f" * 32), record().as_record())
    cache = RecordCache(store)
    assert await store.get_record(TAGS_KIND, "numpy") is None
    assert await cache.tags(NUMPY) == {"latest", "2024-06-01"}
    index = TagsIndex.from_record(await store.get_record(TAGS_KIND, "numpy"))
    assert index is not None and set(index.tags) == {"latest", "2024-06-01"}
    # An index of another schema is no index: scanned again and rewritten.
    await store.put_record(TAGS_KIND, "numpy", {"schema": 0, "tags": ["latest"]})
    assert await cache.tags(NUMPY) == {"latest", "2024-06-01"}
    assert TagsIndex.from_record(await store.get_record(TAGS_KIND, "numpy")) is not None


async def test_an_unknown_name_lists_nothing_and_writes_nothing(store: Store) -> None:
    cache = RecordCache(store)
    assert await cache.tags(parse_name("scipy", {})) == set()
    assert await store.list_records(TAGS_KIND) == []


async def test_concurrent_writers_on_two_replicas_keep_every_tag(store: Store) -> None:
    replicas = [RecordCache(store), RecordCache(store)]
    tags = [f"2024-01-{day:02d}" for day in range(1, 13)]
    await asyncio.gather(*(
        replicas[i % 2].put_image(image_record_key(NUMPY, tag, "f" * 32), record()) for i, tag in enumerate(tags)
    ))
    # Each write lands at once; the check that no other replica's write dropped it runs
    # after the pull is answered.
    await asyncio.gather(*(replica.settled() for replica in replicas))
    assert await replicas[0].tags(NUMPY) == set(tags)
    assert await replicas[1].tags(NUMPY) == set(tags)


@pytest.mark.e2e
def test_tags_list_of_a_served_name_comes_from_its_index(tmp_path: Path, fixture_channel: Path, base_layout: Path) -> None:
    with condery(tmp_path, [str(fixture_channel)], f"oci:{base_layout}:bookworm") as registry:
        status, _, body = registry.get("/v2/xz/manifests/latest", accept=(OCI_MANIFEST,))
        assert status == 200, body
        index_path = registry.store / "records" / TAGS_KIND / "xz.json"
        assert set(json.loads(index_path.read_text())["tags"]) == {"latest"}
        # A date record written behind the index's back (as by a store from before the
        # index): not listed, since tags/list reads the index and scans nothing.
        [latest] = (registry.store / "records" / "images" / "xz" / "_" / "latest").glob("*.json")
        dated = registry.store / "records" / "images" / "xz" / "_" / "2024-06-01" / latest.name
        dated.parent.mkdir()
        dated.write_bytes(latest.read_bytes())
        status, _, body = registry.get("/v2/xz/tags/list")
        assert status == 200 and json.loads(body) == {"name": "xz", "tags": ["latest"]}
        # No index (a store from before it): listed from one scan, and the index written.
        index_path.unlink()
        status, _, body = registry.get("/v2/xz/tags/list?n=1")
        assert status == 200 and json.loads(body)["tags"] == ["2024-06-01"]
        assert set(json.loads(index_path.read_text())["tags"]) == {"latest", "2024-06-01"}
        status, _, body = registry.get("/v2/xz/tags/list")
        assert json.loads(body)["tags"] == ["2024-06-01", "latest"]
