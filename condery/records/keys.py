"""The keys of image and layer records: what each covers, and the one parser of image keys.

- image keys (`<name>/_/<tag>/<fingerprint>`): the fingerprint covers every setting
  that shapes the image (channels without credentials, platforms, prefix, each
  platform's base image as resolved, the definitions of the meta-packages the name
  uses, allow_package_scripts, layer_budget, the layer compressor) and the image layout
  version, so a configuration change can never answer with an image built under another
  one, and the same name, tag and configuration give the same key whatever the store
  holds. `_` can never be a name component, so `<name>/_/<tag>` cannot collide with a
  longer name, and listing `<name>/_/` gives exactly this name's tags.
- layer keys (`<layout>/<sha256>/<inputs>`): every input whose bytes reach the layer:
  the archive (sha256), where it came from (its URL without credentials: conda-meta
  names it), the prefix, the site-packages path for noarch python,
  allow_package_scripts, the bytecode tag, the compressor, and the layer layout version.
- group keys (`group/<hash of the member keys>`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import rattler

from condery.common.redact import redact_url
from condery.config import Config
from condery.image.names import ImageRequest
from condery.layers import PackageError
from condery.layers.compression import COMPRESSOR_ID, GZIP
from condery.layers.package_layer import LAYOUT_VERSION
from condery.layers.solve import channel
from condery.layers.wheels import WHEEL_INSTALLER_ID, WHEEL_LAYOUT, PinnedWheel, PipTarget
from condery.records.schemas import BaseImage

# Bump IMAGE_LAYOUT when the images built from the same inputs change (annotations,
# config, environment layer).
IMAGE_LAYOUT = f"image-v6+layer-{LAYOUT_VERSION}"  # v2: no ref.name annotation; v3: users, default Cmd; v4: conda-meta read-back files; v5: activation in Env, entrypoint; v6: activate.sh under set -u
_SEPARATOR = "/_/"


@dataclass(frozen=True)
class ImageKey:
    """The key of an image record: a canonical name, a tag, a configuration fingerprint."""

    name: str
    tag: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.name}{_SEPARATOR}{self.tag}/{self.fingerprint}"

    @property
    def group(self) -> str:
        """`<name>/_/<tag>`: what every record of this name and tag shares, whatever the configuration."""
        return f"{self.name}{_SEPARATOR}{self.tag}"

    @classmethod
    def of(cls, request: ImageRequest, tag: str, fingerprint: str) -> "ImageKey":
        return cls(request.canonical_name, tag, fingerprint[:32])

    @classmethod
    def parse(cls, key: str) -> "ImageKey | None":
        """The key's parts; None for a key that is not an image key (a stray record)."""
        head, sep, rest = key.rpartition(_SEPARATOR)
        tag, slash, fingerprint = rest.partition("/")
        if not sep or not head or not tag or not slash or not fingerprint or "/" in fingerprint:
            return None
        return cls(head, tag, fingerprint)


def image_record_key(request: ImageRequest, tag: str, fingerprint: str) -> str:
    return str(ImageKey.of(request, tag, fingerprint))


def tags_prefix(name: str) -> str:
    """The prefix every image key of `name` starts with (a listing of its tags)."""
    return name + _SEPARATOR


def fingerprint_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def base_fingerprint(base: BaseImage) -> str:
    """The base as resolved: its config and layers (a tag or a layout that moved gives another)."""
    return fingerprint_of({"config": base.config, "layers": [layer.digest for layer in base.layers]})


class ImageKeys:
    """Image record keys under one configuration.

    A warm pull computes its key on every request, so what changes only with the
    configuration is prepared once, and a base's fingerprint once per resolved base.
    """

    def __init__(self, config: Config) -> None:
        self._static: dict[str, Any] = {
            "layout": IMAGE_LAYOUT,
            # Credentials are no input: the same channel read with another token is the same channel.
            "channels": [redact_url(channel(c).base_url) for c in config.channels],
            "platforms": list(config.platforms),
            "prefix": config.prefix,
            "allow_package_scripts": config.allow_package_scripts,
            "layer_budget": config.layer_budget,
            # Its layers' media types and bytes (the compressor's version: layer_key).
            "layer_compression": COMPRESSOR_ID[config.layer_compression],
        }
        self._meta = {
            name: {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(meta).items()}
            for name, meta in config.meta_packages.items()
        }
        self._bases: dict[str, tuple[BaseImage, str]] = {}  # subdir -> (base, its fingerprint)
        self._pypi_index = redact_url(config.pypi_index).rstrip("/")

    def _base_fingerprint(self, subdir: str, base: BaseImage) -> str:
        known = self._bases.get(subdir)
        if known is None or known[0] is not base:
            known = self._bases[subdir] = (base, base_fingerprint(base))
        return known[1]

    def inputs(self, request: ImageRequest, bases: Mapping[str, BaseImage]) -> dict[str, Any]:
        """Every setting that shapes the image of `request` (logged on a miss, hashed into the key)."""
        return {
            **self._static,
            "bases": {subdir: self._base_fingerprint(subdir, base) for subdir, base in bases.items()},
            # Only the meta-packages this name uses: editing another one changes nothing here.
            "meta_packages": {name: self._meta[name] for name in sorted(request.meta)},
            # An environment file's content (envs/<name> changes with its file), and where its
            # pip packages come from.
            # A caller's channels (auth's channel rules): another set of channels, another image.
            **({} if request.channels is None else {
                "readable_channels": [redact_url(channel(c).base_url) for c in request.channels]}),
            # The kernels' environments by content: an edited team file is another image.
            **({} if not request.kernels else {"kernels": {k.name: k.environment.id for k in request.kernels}}),
            **({} if request.environment is None else {
                "environment": request.environment.id,
                "pypi_index": self._pypi_index if request.environment.pip or request.environment.locked_pip else None,
            }),
        }

    def key(self, request: ImageRequest, tag: str, bases: Mapping[str, BaseImage]) -> str:
        return image_record_key(request, tag, fingerprint_of(self.inputs(request, bases)))


def layer_key(record: rattler.RepoDataRecord, *, prefix: str, site_packages: str | None, allow_scripts: bool,
              bytecode: str | None = None, compression: str = GZIP, owner: tuple[int, int] | None = None) -> str:
    """A storage-safe key for the layer of `record` as this configuration builds it.

    The site-packages path counts for noarch python only, so that e.g. zlib's layer is
    shared by every python version. `bytecode` is the pyc tag ("cpython-311") the layer
    is compiled for (layers/bytecode.py bytecode_for), None when it holds no bytecode of
    ours: a build host without the image's python makes another layer, never this one.
    The compressor (algorithm, library version, level, chunk size) counts too: switching
    layer_compression never serves a layer of the other kind, and a new libdeflate never
    reuses layers it would not write the same. `owner` (uid, gid) of a changeable
    environment's layers: counted only when set, so that root's layers keep their keys
    and every image of one owner shares its layers.
    """
    if record.sha256 is None:
        # build_package_layer refuses it too; a key that cannot name the bytes is no key.
        raise PackageError(f"{record.file_name}: the channel gives no sha256, so it cannot be verified")
    inputs = {
        "url": redact_url(record.url),  # conda-meta/<dist>.json names it
        "prefix": prefix,
        "site_packages": site_packages if record.noarch.python else None,
        "allow_scripts": allow_scripts,
        "bytecode": bytecode,
        "compressor": COMPRESSOR_ID[compression],
        **({} if owner is None else {"owner": list(owner)}),
    }
    return f"{LAYOUT_VERSION}/{record.sha256.hex()}/{fingerprint_of(inputs)[:32]}"


def group_key(member_keys: Sequence[str]) -> str:
    return "group/" + hashlib.sha256("\n".join(member_keys).encode()).hexdigest()


def wheel_layer_key(wheel: PinnedWheel, target: PipTarget, *, bytecode: str | None, compression: str,
                    owner: tuple[int, int] | None = None) -> str:
    """`wheel/<layout>/<sha256>/<inputs>`: the layer of one wheel (layers/wheels.py).

    Every input whose bytes reach the layer: the wheel (sha256), the prefix (scripts'
    shebangs, every path), site-packages, the python version (the headers directory),
    the bytecode tag (None: no pycs of ours), the compressor, and the installer library's
    version (it writes the entry-point scripts). Not the URL or the index: nothing of
    where the wheel came from is written into the layer.
    """
    inputs = {
        "prefix": target.prefix,
        "site_packages": target.site_packages,
        "python": target.python,
        "bytecode": bytecode,
        "compressor": COMPRESSOR_ID[compression],
        "installer": WHEEL_INSTALLER_ID,
        **({} if owner is None else {"owner": list(owner)}),  # layer_key's rule
    }
    return f"wheel/{WHEEL_LAYOUT}/{wheel.sha256}/{fingerprint_of(inputs)[:32]}"
