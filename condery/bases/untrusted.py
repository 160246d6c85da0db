"""Checks of an untrusted base image's manifest and config, before a byte of its layers
is fetched: shapes and types, the layer budget, the total download size, and that the
config fits the manifest (diff_ids, platform, the settings condery copies from it)."""

from __future__ import annotations

from typing import Any

from condery.bases.errors import BaseImageError
from condery.oci.grammar import is_digest
from condery.oci.manifest import LAYER_TYPES, Descriptor, ManifestError, parse_descriptor, quoted
from condery.oci.media_types import CONFIG_TYPES
from condery.oci.platforms import OciPlatform

MAX_CONFIG_SIZE = 8 << 20
# What one base may make us download (the sum of its distinct layers' declared sizes). A
# module constant rather than a configuration key: the largest real bases (CUDA devel
# images) are a few GB compressed, so this only ever stops a hostile or broken base.
MAX_BASE_SIZE = 20 << 30
# Layers besides the base's that every image has: at least one of packages, and the
# environment's own (the build's grouping keeps the image within layer_budget).
OWN_LAYERS = 2


def too_many_layers(count: int, layer_budget: int) -> BaseImageError:
    return BaseImageError(
        f"{count} layers; with layer_budget {layer_budget} a base may have at most "
        f"{max(0, layer_budget - OWN_LAYERS)} (every image adds at least {OWN_LAYERS} layers of its own)"
    )



def parse_image_manifest(doc: dict[str, Any], layer_budget: int) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """The config and layer descriptors of an untrusted image manifest, in order.

    Refuses more layers than `layer_budget` leaves room for, and a base whose distinct
    layers would make us download more than MAX_BASE_SIZE: both before a byte of them
    is fetched.
    """
    config_desc = parse_descriptor(doc.get("config"))
    if config_desc.media_type not in CONFIG_TYPES:
        raise ManifestError(f"config media type {quoted(config_desc.media_type)} is not an image config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError("manifest has no layers list")
    if len(raw_layers) > layer_budget - OWN_LAYERS:
        raise too_many_layers(len(raw_layers), layer_budget)
    layers = tuple(parse_descriptor(d) for d in raw_layers)
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ManifestError(f"unsupported layer media type {quoted(layer.media_type)}")
    total = sum(layer.size for layer in distinct_layers(layers))
    if total > MAX_BASE_SIZE:
        raise ManifestError(f"the base's layers add up to {total} bytes, over the {MAX_BASE_SIZE} byte limit")
    return config_desc, layers


def distinct_layers(layers: tuple[Descriptor, ...]) -> list[Descriptor]:
    """Each digest once, in the order of first appearance.

    A manifest may list one blob several times (the image then has that layer several
    times), but it is one download, one check and one stored blob.
    """
    seen: dict[str, Descriptor] = {}
    for layer in layers:
        first = seen.setdefault(layer.digest, layer)
        if first.size != layer.size:
            raise ManifestError(f"layer {layer.digest} is listed with sizes {first.size} and {layer.size}")
    return list(seen.values())


def checked_config(config: dict[str, Any], layers: tuple[Descriptor, ...], platform: OciPlatform) -> dict[str, str]:
    """Each layer digest's diff_id, from an untrusted image config that must fit the manifest.

    Also checks the fields that our own image config is built from, so that a base with a
    malformed config is refused here rather than failing every build on top of it.
    """
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) or not all(
        is_digest(d) for d in diff_ids
    ):
        raise ManifestError("image config's rootfs.diff_ids do not match the manifest's layers")
    if (config.get("os"), config.get("architecture")) != (platform.os, platform.architecture):
        found = f"{str(config.get('os'))[:40]}/{str(config.get('architecture'))[:40]}"
        raise ManifestError(f"image is for {found}, not {platform}")
    by_digest: dict[str, str] = {}
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        if by_digest.setdefault(layer.digest, diff_id) != diff_id:
            raise ManifestError(f"layer {layer.digest} is listed with two different diff_ids")
    _check_settings(config)
    return by_digest


def _check_settings(config: dict[str, Any]) -> None:
    """The fields oci/manifest.image_config copies from a base, with the types it needs."""
    settings = config.get("config")
    if settings is not None and not isinstance(settings, dict):
        raise ManifestError("image config's 'config' is not an object")
    settings = settings or {}
    for key in ("Env", "Entrypoint", "Cmd"):
        value = settings.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise ManifestError(f"image config's {key} is not a list of strings")
    labels = settings.get("Labels")
    if labels is not None and not (
        isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())
    ):
        raise ManifestError("image config's Labels do not map strings to strings")
    for key in ("User", "WorkingDir", "StopSignal"):
        if settings.get(key) is not None and not isinstance(settings[key], str):
            raise ManifestError(f"image config's {key} is not a string")
    for key in ("ExposedPorts", "Volumes"):
        if settings.get(key) is not None and not isinstance(settings[key], dict):
            raise ManifestError(f"image config's {key} is not an object")
    if not isinstance(config.get("history", []), list):
        raise ManifestError("image config's history is not a list")


