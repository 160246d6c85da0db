"""Writing an image from the store to an OCI image layout directory (`condery build`)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from condery.storage import Store

async def write_oci_layout(store: Store, digest: str, media_type: str, size: int, tag: str, out_dir: Path) -> None:
    """Copy a manifest (or index) and every blob it reaches into the layout at out_dir.

    An existing layout is extended: blobs are content-addressed, and the tag's entry in
    index.json is replaced.
    """
    blobs = out_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (out_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    pending = [digest]
    while pending:
        current = pending.pop()
        data = await _copy_blob(store, current, blobs)
        if data is None:
            continue
        document = json.loads(data)
        children = [m["digest"] for m in document.get("manifests", [])]
        if "config" in document:
            children += [document["config"]["digest"], *(layer["digest"] for layer in document["layers"])]
        pending.extend(children)

    index_path = out_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ]
    index["manifests"].append(
        {
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    )
    index.setdefault("mediaType", "application/vnd.oci.image.index.v1+json")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".index-")
    with os.fdopen(fd, "w") as handle:
        json.dump(index, handle, indent=2)
    os.replace(tmp, index_path)


async def _copy_blob(store: Store, digest: str, blobs: Path) -> bytes | None:
    """Copy one blob; return its bytes when it is a small JSON document worth walking."""
    target = blobs / digest.split(":", 1)[1]
    info = await store.blob_info(digest)
    if info is None:
        raise KeyError(f"blob {digest} is missing from the store")
    small = info.size <= 4 << 20
    head = b""
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".blob-")
        with os.fdopen(fd, "wb") as handle:
            async for chunk in store.read_blob(digest):
                handle.write(chunk)
        os.replace(tmp, target)
    if small:
        head = target.read_bytes()
        if head[:1] == b"{" and b'"schemaVersion"' in head:
            return head
    return None
