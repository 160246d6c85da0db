"""Benchmark: tags/list latency with 10,000 images in the store beside 10.

    python3 bench/bench_tags_list.py [--images N]

tags/list reads one index record per name (records/schemas.py `TagsIndex`), so its cost should not
grow with the store. This fills two filesystem stores, one with 10 image records and one
with 10,000 (1,000 names of 10 date tags; the same 10 records for the name listed), then
times RecordCache.tags for one name in each: the first call (no index yet: one scan,
then the index is written, as on a store from before the index) and the median of the
calls after it. The scan tags/list did before the index is timed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from condery.config import StorageConfig  # noqa: E402
from condery.image.names import ImageRef, parse_name  # noqa: E402
from condery.records.cache import RecordCache
from condery.records.keys import image_record_key, tags_prefix  # noqa: E402
from condery.records.schemas import ImageRecord
from condery.storage import Store
from condery.storage.backends import open_store  # noqa: E402

TAGS_PER_NAME = 10
CALLS = 200
REF = ImageRef("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json",
               "sha256:" + "b" * 64, "application/vnd.docker.distribution.manifest.v2+json")


async def fill(store: Store, images: int) -> None:
    record = ImageRecord(REF, 1.0, {"linux/amd64": {"oci": REF.oci_digest}}).as_record()
    names = ["numpy"] + [f"pkg{i}" for i in range(images // TAGS_PER_NAME - 1)]
    writes = [
        store.put_record("images", image_record_key(parse_name(name, {}), f"2024-01-{day:02d}", "f" * 32), record)
        for name in names for day in range(1, TAGS_PER_NAME + 1)
    ]
    for start in range(0, len(writes), 500):
        await asyncio.gather(*writes[start:start + 500])


async def timed(call) -> float:  # noqa: ANN001
    start = time.perf_counter()
    await call()
    return time.perf_counter() - start


async def measure(images: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(StorageConfig(backend="filesystem", path=str(Path(tmp) / "store")))
        await fill(store, images)
        request = parse_name("numpy", {})
        cache = RecordCache(store)
        scans = [await timed(lambda: store.list_records("images", tags_prefix(request.canonical_name))) for _ in range(10)]
        first = await timed(lambda: cache.tags(request))
        assert len(await cache.tags(request)) == TAGS_PER_NAME
        indexed = [await timed(lambda: cache.tags(request)) for _ in range(CALLS)]
        await store.close()
    return {"scan": statistics.median(scans), "first": first, "indexed": statistics.median(indexed)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()
    small, large = asyncio.run(measure(10)), asyncio.run(measure(args.images))
    print(f"{'':28} {'10 images':>12} {f'{args.images:,} images':>14} {'ratio':>7}")
    for key, label in (("indexed", "tags/list (index), median"), ("first", "first call (scan + index)"),
                       ("scan", "scan before the index")):
        print(f"{label:28} {small[key] * 1e3:10.3f}ms {large[key] * 1e3:12.3f}ms {large[key] / small[key]:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
