"""The effective configuration as YAML, for `condery config`: secrets masked, loadable again."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import yaml

from condery.common.redact import redact_text
from condery.config.load import _COORDINATION_KEYS, _FIELDS, _STORAGE_KEYS, _join
from condery.config.schema import AuthConfig, Config

MASK = "***"
# Keys whose values are secrets wherever they appear (meta_packages' env, mostly).
_SECRET_KEY = re.compile(r"token|passw|secret|credential|api_?key|auth|private", re.IGNORECASE)
# Keys the pattern above would take for secrets that are settings (auth's lifetimes).
_NOT_SECRET = frozenset({"token_ttl", "refresh_token_ttl"})
# Where aiobotocore's default chain takes S3 credentials from (condery reads none itself).
_S3_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _plain(config: Config) -> dict[str, Any]:
    """The configuration as YAML-ready data that load_config reads back to the same Config."""
    data: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(config, name)
        if name == "storage":
            keys = ("backend", *sorted(_STORAGE_KEYS[value.backend]))
            value = {k: getattr(value, k) for k in keys if getattr(value, k) is not None}
        elif name == "coordination":
            value = {k: getattr(value, k) for k in ("backend", *sorted(_COORDINATION_KEYS[value.backend]))}
        elif name == "gc":
            value = dataclasses.asdict(value)
        elif name == "meta_packages":
            value = {
                meta: {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v)
                       for k, v in dataclasses.asdict(package).items() if v is not None and v != ()}
                for meta, package in value.items()
            }
        elif name == "auth" and value is not None:
            value = _plain_auth(value)
        elif isinstance(value, tuple):
            value = list(value)
        data[name] = value
    return data


def _lists(value: Any) -> Any:
    """Tuples as lists and mappings as dicts, all the way down (for yaml.safe_dump)."""
    if isinstance(value, Mapping):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _plain_auth(auth: AuthConfig) -> dict[str, Any]:
    """The auth section as written in a file; unset keys (None) are left out."""
    data = _lists(dataclasses.asdict(auth))
    return {key: item for key, item in data.items() if item is not None}


def _mask(value: Any, path: str, masked: list[str]) -> Any:
    """`value` with every secret replaced, the paths of what was masked added to `masked`."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            child = _join(path, key)
            # Scalars only: a meta-package may well be called `auth`; its settings are no secret.
            # A `*_file` key (base_image_auth_file) names where secrets are, which is none.
            if (_SECRET_KEY.search(str(key)) and not str(key).endswith("_file") and key not in _NOT_SECRET
                    and isinstance(item, (str, int, float)) and item != ""):
                out[key] = MASK
                masked.append(child)
            else:
                out[key] = _mask(item, child, masked)
        return out
    if isinstance(value, list):
        return [_mask(item, f"{path}[{i}]", masked) for i, item in enumerate(value)]
    if isinstance(value, str) and redact_text(value) != value:  # a URL with userinfo or /t/<token>
        masked.append(path)
        return redact_text(value)
    return value


def effective_yaml(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The configuration as YAML, secrets masked, loadable again with `--config`.

    Credentials inside URLs are removed (common/redact.py), values of secret-looking keys are
    replaced by `***`, and S3 credentials found in the environment are only named.
    """
    environ = os.environ if environ is None else environ
    masked: list[str] = []
    data = _mask(_plain(config), "", masked)
    header = ["# condery: the effective configuration (defaults, file, CONDERY_* variables, flags)"]
    if masked:
        header.append(f"# secrets masked or removed: {', '.join(masked)}")
    if config.storage.backend == "s3":
        found = [name for name in _S3_CREDENTIAL_VARIABLES if environ.get(name)]
        header.append(f"# S3 credentials from the environment: {', '.join(found) if found else 'none'}"
                      f"{f' (values {MASK})' if found else ' (aiobotocore default chain)'}")
    return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
