"""Bounded memory: the server's peak RSS while it builds a layer, its layer worker
processes' included (procs.peak_rss adds up the process tree), does not grow with the
package. A build that read an archive, a file or a layer whole (or an upload that did)
would add the package's size to the peak; the 3x larger package here would show it as
~64 MB more. The full series (100 MB to 1 GB) is bench/bench_memory.py.
"""

from __future__ import annotations

from pathlib import Path

from tests.fixtures.condapkg import index_channel, write_bulk_package
from tests.fixtures.procs import peak_rss, reset_peak_rss, running
from tests.test_e2e import OCI_MANIFEST, Registry, serve

MB = 1 << 20
SMALL, LARGE = 32, 96  # MB unpacked
MARGIN = 24 * MB  # allocator noise between two builds; far below the 64 MB a whole read adds


def test_peak_rss_does_not_grow_with_package_size(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    for size in (SMALL, LARGE):
        write_bulk_package(channel, f"bulk-{size}", size=size * MB, small_files=500)
    index_channel(channel)
    peaks = {}
    # One layer worker: both packages are written in the same process, so that the sum of
    # the tree's peaks compares like with like (a second worker's first build would add
    # its own ~30 MB of working memory to the second figure, not the package's size).
    argv, store, port = serve(tmp_path, [str(channel)], "scratch", layer_workers=1)
    registry = Registry(f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", store)
    with running(argv, url=registry.url + "/v2/", log_path=tmp_path / "condery.log", timeout=60) as proc:
        for size in (SMALL, LARGE):
            reset_peak_rss(proc.pid)
            status, _, body = registry.get(f"/v2/bulk-{size}/manifests/latest", accept=(OCI_MANIFEST,))
            assert status == 200, body
            peaks[size] = peak_rss(proc.pid)
    assert peaks[LARGE] - peaks[SMALL] < MARGIN, {k: v // MB for k, v in peaks.items()}
    assert peaks[LARGE] < 300 * MB
