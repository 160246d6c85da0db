"""The Store a storage configuration names: the one place that knows every backend.

Apart from the interface (storage/__init__.py) so that the backends, which implement
it, and the interface never import each other both ways. The S3 backend is imported
only when configured: aiobotocore is heavy, and a filesystem store never needs it.
"""

from __future__ import annotations

from pathlib import Path

from condery.config import StorageConfig
from condery.storage import Store


def open_store(config: StorageConfig) -> Store:
    """The Store for a storage configuration."""
    if config.backend == "filesystem":
        from condery.storage.filesystem import FilesystemStore

        return FilesystemStore(Path(config.path))
    if config.backend == "s3":
        from condery.storage.s3 import S3Store

        return S3Store(config)
    raise ValueError(f"unknown storage backend {config.backend!r}")
