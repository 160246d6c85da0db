"""End to end: hostile packages and secret-bearing channels behind a real `condery serve`.

What an attacker gets by pulling: a clear refusal naming the package, never a byte of
the host (its files, the server's environment) and never a channel credential, in any
blob of the store, any error body or any log line.
"""

from __future__ import annotations

import gzip
import secrets
import shutil
from pathlib import Path

import pytest

from tests.fixtures.clients import oci_validate, skopeo_copy
from tests.fixtures.condapkg import index_channel
from tests.fixtures.token_channel import token_channel
from tests.test_e2e import condery
from tests.test_hostile_packages import hostile_packages

pytestmark = pytest.mark.e2e


def readable(path: Path) -> bytes:
    """A file's bytes, gunzipped when it is a gzip layer (a secret would hide in the stream)."""
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def store_holds(store: Path, needle: bytes) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file() and not p.is_symlink() and needle in readable(p)]


def test_hostile_packages_leak_nothing(tmp_path: Path, base_layout: Path) -> None:
    secret = Path("/tmp") / f"condery-secret-{secrets.token_hex(4)}"
    secret.mkdir()
    shadow = f"root:{secrets.token_hex(16)}:19000:0:99999:7:::\n".encode()
    (secret / "shadow").write_bytes(shadow)
    canary = "canary-" + secrets.token_hex(12)
    try:
        channel = tmp_path / "channel"
        hostile_packages(channel, secret)
        index_channel(channel)
        with condery(tmp_path, [str(channel)], f"oci:{base_layout}:bookworm",
                     env={"CONDERY_TEST_CANARY": canary, "AWS_SECRET_ACCESS_KEY": canary}) as registry:
            for name in ("etclink", "procenv", "dirlink", "chain", "linkasfile", "hardtolink", "whiteout", "newline"):
                status, code, message = registry.error_code(f"/v2/{name}/manifests/latest")
                assert (status, code) == (404, "MANIFEST_UNKNOWN"), (name, message)
                assert f"{name}-1.0-h0" in message
                assert str(tmp_path) not in message and "/tmp/" not in message.replace(str(secret), ""), message
            # The registry still serves a good (old-style) package from the same channel.
            layout = tmp_path / "oci"
            skopeo_copy(f"docker://{registry.host}/legacygood:latest", layout, "latest")
            oci_validate(layout)
            log = (tmp_path / "condery.log").read_bytes()
        assert not store_holds(registry.store, shadow.strip())
        assert not store_holds(registry.store, canary.encode())
        assert not store_holds(layout, canary.encode()) and not store_holds(layout, shadow.strip())
        assert canary.encode() not in log and shadow.strip() not in log
    finally:
        shutil.rmtree(secret, ignore_errors=True)


def test_channel_credentials_never_reach_images_errors_or_logs(
        tmp_path: Path, fixture_channel: Path, base_layout: Path) -> None:
    token, password = "tk-" + secrets.token_hex(10), "pw" + secrets.token_hex(8)
    with token_channel(fixture_channel, token, "alice", password) as channel:
        with condery(tmp_path, [channel.url], f"oci:{base_layout}:bookworm") as registry:
            layout = tmp_path / "oci"
            skopeo_copy(f"docker://{registry.host}/xz:latest", layout, "latest")
            oci_validate(layout)
            status, _, body = registry.get("/v2/no-such-package-anywhere/manifests/latest")
            assert status == 404
            log = (tmp_path / "condery.log").read_bytes()
        assert any(path.startswith(f"/t/{token}/channel/") for path in channel.requests)  # it was used
    for secret in (token.encode(), password.encode()):
        assert not store_holds(layout, secret), "a pulled blob holds the channel's credential"
        assert not store_holds(registry.store, secret), "a stored blob or record holds the channel's credential"
        assert secret not in body and secret not in log
    # The image still names where its packages came from, without the credentials.
    layers = b"".join(readable(p) for p in (layout / "blobs" / "sha256").iterdir())
    assert f"http://127.0.0.1:{channel.url.rsplit(':', 1)[1].split('/')[0]}/channel/linux-64/xz-".encode() in layers
