"""Manifest references (DESIGN.md "Tags")."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from condery.oci.errors import ManifestUnknown
from condery.image.tags import Digest, Latest, Snapshot, parse_reference

NOW = datetime(2024, 7, 1, 12, 0, tzinfo=timezone.utc)
DIGEST = "sha256:" + "ab" * 32


def test_latest() -> None:
    assert parse_reference("latest", NOW) == Latest()


def test_snapshot_ends_at_the_end_of_the_utc_day() -> None:
    ref = parse_reference("2024-06-01", NOW)
    assert isinstance(ref, Snapshot)
    assert ref.day == date(2024, 6, 1)
    assert ref.exclude_newer.tzinfo is not None
    assert ref.exclude_newer.utcoffset() == timedelta(0)
    # Everything published on that day counts, nothing of the next day does.
    assert ref.exclude_newer >= datetime(2024, 6, 1, 23, 59, 59, 999000, tzinfo=timezone.utc)
    assert ref.exclude_newer < datetime(2024, 6, 2, tzinfo=timezone.utc)
    assert str(ref) == "2024-06-01"


def test_leap_day() -> None:
    assert parse_reference("2024-02-29", NOW).day == date(2024, 2, 29)  # type: ignore[union-attr]


def test_digest() -> None:
    assert parse_reference(DIGEST, NOW) == Digest(DIGEST)


@pytest.mark.parametrize(
    "ref",
    [
        "2024-02-30",  # not a date
        "2023-02-29",
        "2024-13-01",
        "0000-01-01",
        "2024-6-1",  # not the YYYY-MM-DD form
        "20240601",
        "2024-07-01",  # today (at NOW) has not ended: the answer could still change
        "2099-01-01",
        "v1.0",
        "Latest",
        "",
        ".hidden",
        "-x",
        "a" * 129,
        "sha256:" + "AB" * 32,  # digests are lowercase hex
        "sha256:abc",
        "sha512:" + "ab" * 64,
        DIGEST + "\n",
        "latest\n",
    ],
)
def test_everything_else_is_manifest_unknown(ref: str) -> None:
    with pytest.raises(ManifestUnknown) as info:
        parse_reference(ref, NOW)
    assert info.value.status == 404 and info.value.code == "MANIFEST_UNKNOWN"


def test_yesterday_is_a_snapshot() -> None:
    assert isinstance(parse_reference("2024-06-30", NOW), Snapshot)


@given(st.text(max_size=150))
def test_arbitrary_text_only_raises_manifest_unknown(ref: str) -> None:
    try:
        parse_reference(ref, NOW)
    except ManifestUnknown:
        pass
