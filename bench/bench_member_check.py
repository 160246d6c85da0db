"""Benchmark: the archive member check (layers/members.py) beside a plain extraction.

    python3 bench/bench_member_check.py [ARCHIVE ...]

Every package layer build first reads the archive's members and checks them against
info/paths.json, so that a package cannot make the installer read host files. That is
one extra decompression pass. This prints, for each real package in the shared fixtures
(or the archives given), the time of the check beside the time py-rattler takes to
extract the same archive (which the installer does anyway), and the ratio over all.
Every archive must pass the check: a refusal of a real package is printed and fails.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import rattler.package_streaming as package_streaming

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from condery.layers.members import PackageLimits, verify_archive  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "anaconda-main-2020"


async def _metadata(archive: Path) -> dict[str, bytes | None]:
    pkg = await package_streaming.PackageArchive.from_path(archive)
    return await pkg.read_files(["info/paths.json", "info/files", "info/has_prefix"])


def main() -> int:
    archives = [Path(a) for a in sys.argv[1:]] or sorted(
        p for p in FIXTURES.rglob("*") if p.name.endswith((".conda", ".tar.bz2")))
    total_check = total_extract = 0.0
    failures = 0
    print(f"{'package':60s} {'check':>8s} {'extract':>8s}")
    for archive in archives:
        info = asyncio.run(_metadata(archive))
        started = time.perf_counter()
        try:
            verify_archive(archive, info["info/paths.json"], info["info/files"], info["info/has_prefix"],
                           PackageLimits())
        except Exception as exc:  # noqa: BLE001 - a refusal of a real package is the finding
            print(f"{archive.name:60s} REFUSED: {exc}")
            failures += 1
            continue
        check = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            package_streaming.extract(archive, Path(tmp))  # synchronous in py-rattler 0.28
            extract = time.perf_counter() - started
        total_check += check
        total_extract += extract
        print(f"{archive.name:60s} {check * 1000:7.1f}ms {extract * 1000:7.1f}ms")
    print(f"total over {len(archives)} archives: check {total_check:.3f} s, rattler extract {total_extract:.3f} s, "
          f"ratio check/extract {total_check / max(total_extract, 1e-9):.2f}x")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
