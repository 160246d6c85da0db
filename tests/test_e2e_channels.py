"""End to end: a real `condery serve` pulling packages from channels over real HTTP.

A private channel whose credentials are only in rattler's auth file (RATTLER_AUTH_FILE),
and a public one that fails the way networks and servers do, pulled from with skopeo.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from tests.fixtures.clients import oci_validate, skopeo_copy
from tests.fixtures.http_channel import faulty_channel
from tests.fixtures.token_channel import token_channel
from tests.test_e2e import condery
from tests.test_e2e_hostile import store_holds
from tests.test_http_channels import channel_dir  # noqa: F401 - a fixture: packages "small" and "other"

pytestmark = pytest.mark.e2e


def test_private_channel_through_the_auth_file(tmp_path: Path, channel_dir: Path, base_layout: Path) -> None:
    token = "tk-" + secrets.token_hex(16)
    auth = tmp_path / "credentials.json"
    auth.write_text(json.dumps({"127.0.0.1": {"BearerToken": token}}))
    empty = tmp_path / "none.json"
    empty.write_text("{}")
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    with token_channel(channel_dir, token, "alice", "unused", require="bearer") as channel:
        with condery(tmp_path / "with", [channel.url], f"oci:{base_layout}:bookworm",
                     env={"RATTLER_AUTH_FILE": str(auth)}) as registry:
            layout = tmp_path / "oci"
            skopeo_copy(f"docker://{registry.host}/small:latest", layout, "latest")
            oci_validate(layout)
            log = (tmp_path / "with" / "condery.log").read_bytes()
        assert any(path.endswith("/small-1.0-h0.tar.bz2") for path in channel.requests)
        assert not store_holds(layout, token.encode()) and not store_holds(registry.store, token.encode())
        assert token.encode() not in log

        # Without the credentials the channel refuses: a 503 that says so, logged for the operator.
        with condery(tmp_path / "without", [channel.url], f"oci:{base_layout}:bookworm",
                     env={"RATTLER_AUTH_FILE": str(empty)}) as registry:
            status, headers, body = registry.get("/v2/small/manifests/latest")
            log = (tmp_path / "without" / "condery.log").read_text()
        assert status == 503 and int(headers["Retry-After"]) > 0, body
        error = json.loads(body)["errors"][0]
        assert error["code"] == "UNAVAILABLE"
        assert "refused access (HTTP 401)" in error["message"]
        assert "refused access" in log and "RATTLER_AUTH_FILE" in log
        assert token not in body.decode() and token not in log and str(tmp_path) not in body.decode()


def test_flaky_channel(tmp_path: Path, channel_dir: Path, base_layout: Path) -> None:
    with faulty_channel(channel_dir) as channel:
        with condery(tmp_path, [channel.url], f"oci:{base_layout}:bookworm") as registry:
            # Passing faults are retried (0.5 s, then 1 s): the pull works.
            channel.fail("small", "500", "reset")
            skopeo_copy(f"docker://{registry.host}/small:latest", tmp_path / "oci", "latest")
            assert channel.package_requests("small") == 3

            # Bytes that changed under the same URL are refused, and nothing of them is kept.
            channel.fail("other", "swap")
            status, code, message = registry.error_code("/v2/other/manifests/latest")
            assert (status, code) == (404, "MANIFEST_UNKNOWN")
            assert "other-1.0-h0: sha256 mismatch" in message and str(tmp_path) not in message
            assert not list((tmp_path / "pkgs").rglob("other-*"))

            # A 4xx is the channel's answer: not retried, a 503 for the client to retry later.
            channel.fail("other", "404")
            status, code, message = registry.error_code("/v2/other/manifests/latest")
            assert (status, code) == (503, "UNAVAILABLE") and "answered HTTP 404" in message
            assert channel.package_requests("other") == 2

            # The channel is right again: the same name builds.
            skopeo_copy(f"docker://{registry.host}/other:latest", tmp_path / "oci", "other")
            assert channel.package_requests("other") == 3
