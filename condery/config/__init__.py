"""Configuration: one YAML file, every key also settable as CONDERY_<KEY>.

    schema.py   the dataclasses and their embedded defaults
    load.py     reading and checking a file, the environment and flags (every problem at once)
    output.py   the effective configuration as YAML, secrets masked (`condery config`)

Precedence, lowest first: embedded defaults, the YAML file, environment variables,
command-line flags. Environment values are parsed as YAML so that
`CONDERY_CHANNELS='[conda-forge, bioconda]'` and `CONDERY_PORT=8080` both work.
"""

from condery.config.load import load_config
from condery.config.output import effective_yaml
from condery.config.schema import (
    DEFAULT_BASE_IMAGE,
    Config,
    ConfigError,
    CoordinationConfig,
    GcConfig,
    StorageConfig,
)

__all__ = ["DEFAULT_BASE_IMAGE", "Config", "ConfigError", "CoordinationConfig", "GcConfig", "StorageConfig",
           "effective_yaml", "load_config"]
