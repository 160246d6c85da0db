"""Credentials in channel URLs never leave: URLs, free text, log records."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from condery.common.redact import RedactingFilter, redact_text, redact_url, redact_values


@pytest.mark.parametrize(("url", "expected"), [
    ("https://conda.anaconda.org/t/tk-abc123/my-channel/linux-64/x-1-0.conda",
     "https://conda.anaconda.org/my-channel/linux-64/x-1-0.conda"),
    ("https://user:s3cret@repo.example.org/channel/noarch/y.conda", "https://repo.example.org/channel/noarch/y.conda"),
    ("https://user:s3cret@repo.example.org:8443/t/TOKEN/c", "https://repo.example.org:8443/c"),
    ("https://conda.anaconda.org/conda-forge/linux-64/z.conda", "https://conda.anaconda.org/conda-forge/linux-64/z.conda"),
    ("file:///srv/channel/linux-64/z.conda", "file:///srv/channel/linux-64/z.conda"),
    ("https://host/channel/t/not-a-token-position/x", "https://host/channel/t/not-a-token-position/x"),
])
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_secret_query_values_are_masked() -> None:
    """redis-py and some mirrors read a password or token from the query string."""
    assert redact_url("redis://redis:6379/0?password=s3cret&db=1") == "redis://redis:6379/0?password=***&db=1"
    assert redact_text("GET https://m.example/c/repodata.json?access_token=abc failed") == (
        "GET https://m.example/c/repodata.json?access_token=*** failed")
    assert redact_url("https://m.example/c/?platform=linux-64") == "https://m.example/c/?platform=linux-64"


def test_redact_text_and_values() -> None:
    text = "failed to fetch https://u:pw@h.example/t/TKN/ch/repodata.json: 403; also http://a:b@c/d"
    assert redact_text(text) == "failed to fetch https://h.example/ch/repodata.json: 403; also http://c/d"
    value = {"url": "https://u:pw@h/t/TKN/c/x.conda", "depends": ["a"], "n": 1, "nested": [{"channel": "https://h/t/TKN/c"}]}
    assert "TKN" not in str(redact_values(value)) and "pw" not in str(redact_values(value))


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40).filter(lambda s: s.strip()),
       st.from_regex(r"[A-Za-z0-9_-]{8,40}", fullmatch=True))
def test_a_token_never_survives(prefix: str, token: str) -> None:
    for url in (f"https://conda.example.org/t/{token}/ch", f"https://user:{token}@conda.example.org/ch"):
        assert token not in redact_text(f"{prefix} {url} {prefix}") or token in prefix
        assert token not in redact_url(url)


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("condery.test_redact")
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    caplog.handler.addFilter(RedactingFilter())
    logger.warning("download from %s failed", "https://u:pw@h/t/TKN/c/x.conda")
    try:
        raise RuntimeError("GET https://h/t/TKN/c/repodata.json: 401")
    except RuntimeError:
        logger.exception("solve failed")
    assert "TKN" not in caplog.text and ":pw@" not in caplog.text
    assert "https://h/c/x.conda" in caplog.text and "RuntimeError" in caplog.text
