"""The records' schemas: one dataclass per record kind that has fields (kinds.py), each
with its `as_record` and a `from_record` that reads a record of another schema, or a
malformed one, as absent (None): it is rebuilt, never half-trusted.

Every field that names a blob is checked to be a digest here, so that no stored
record, however it was damaged, hands the store a malformed name (a ValueError, a 500)
instead of reading as a miss. Bump a schema number when its record's fields change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from condery.image.names import ImageRef
from condery.layers.activation_scripts import PackageScripts
from condery.oci.grammar import is_digest
from condery.oci.manifest import Descriptor

IMAGE_SCHEMA = 2
LAYER_SCHEMA = 3  # 3: a package layer's activation scripts, programs and path digests
TAGS_SCHEMA = 1


@dataclass(frozen=True)
class BaseImage:
    """A base image as imported (kind base-images): every blob it names is stored and verified."""

    config: Mapping[str, Any] | None  # the base image config JSON (None for scratch)
    layers: tuple[Descriptor, ...]  # blobs present in the store, digests verified
    diff_ids: tuple[str, ...]
    glibc_version: str | None  # e.g. "2.36"; None when the base has no glibc we can see
    # /etc/passwd and /etc/group as the base's layers leave them (None: absent), so that an
    # image with a user of its own keeps the base's accounts (env_layer.py).
    passwd: str | None = None
    group: str | None = None


SCRATCH = BaseImage(config=None, layers=(), diff_ids=(), glibc_version=None)
_REF_FIELDS = frozenset(f.name for f in fields(ImageRef))


def _digest(value: Any) -> str:
    """A digest field of a stored record: every one reaches the store as a blob's name."""
    if not is_digest(value):
        raise ValueError("not a sha256 digest")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("not a string")
    return value


@dataclass(frozen=True)
class LayerEntry:
    """A stored layer: the record kept under its cache key."""

    key: str
    digest: str
    diff_id: str
    size: int
    packages: tuple[str, ...]
    # A conda package's part in activation (layers/activation_scripts.py), read from its
    # archive when the layer was built, so that warm builds know it; None for other layers.
    scripts: PackageScripts | None = None

    def as_record(self) -> dict:
        return {
            "schema": LAYER_SCHEMA,
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "packages": list(self.packages),
            **({"scripts": self.scripts.as_record()} if self.scripts is not None else {}),
        }

    @classmethod
    def from_record(cls, key: str, record: Mapping) -> "LayerEntry | None":
        if record.get("schema") != LAYER_SCHEMA:
            return None
        try:
            size, packages = record["size"], record["packages"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                return None
            if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
                return None
            scripts = record.get("scripts")
            return cls(key, _digest(record["digest"]), _digest(record["diff_id"]), size, tuple(packages),
                       None if scripts is None else PackageScripts.from_record(scripts))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class ImageRecord:
    """What a name, tag and configuration resolved to, and when its data was current."""

    ref: ImageRef
    data_as_of: float  # wall clock: when the oldest repodata the solve used was fetched
    platforms: Mapping[str, Mapping[str, str]]  # "os/arch" -> oci, docker, lock_sha256
    skipped: Mapping[str, str] = field(default_factory=dict)  # conda subdir -> why it did not solve

    def as_record(self) -> dict:
        return {
            "schema": IMAGE_SCHEMA,
            "ref": self.ref.__dict__,
            "data_as_of": self.data_as_of,
            "platforms": dict(self.platforms),
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_record(cls, record: Mapping) -> "ImageRecord | None":
        if record.get("schema") != IMAGE_SCHEMA:
            return None
        try:
            ref = record["ref"]
            if not isinstance(ref, Mapping) or set(ref) != _REF_FIELDS:
                return None
            ref = ImageRef(_digest(ref["oci_digest"]), _text(ref["oci_media_type"]),
                           _digest(ref["docker_digest"]), _text(ref["docker_media_type"]))
            platforms = {
                _text(name): {"oci": _digest(p["oci"]), "docker": _digest(p["docker"]),
                              "lock_sha256": _text(p.get("lock_sha256", ""))}
                for name, p in record["platforms"].items()
            }
            skipped = {_text(k): _text(v) for k, v in record.get("skipped", {}).items()}
            return cls(ref, float(record["data_as_of"]), platforms, skipped)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class TagsIndex:
    """The tags of one name (kind `tags`, key: the canonical name) and when each was last
    written (wall clock), so that `tags/list` reads one record rather than listing every
    image record of the name."""

    tags: Mapping[str, float]

    def as_record(self) -> dict:
        return {"schema": TAGS_SCHEMA, "tags": dict(sorted(self.tags.items()))}

    @classmethod
    def from_record(cls, record: Mapping | None) -> "TagsIndex | None":
        if record is None or record.get("schema") != TAGS_SCHEMA:
            return None
        try:
            return cls({str(tag): float(at) for tag, at in record["tags"].items()})
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
