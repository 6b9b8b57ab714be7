"""The typed configuration: one dataclass per group, composed by Hydra from conf/ and checked.

Both apps call :func:`load_config` with the same run config, so client and server always see
the same resolved configuration. Each group's dataclass declares its fields (type, default,
help, choices) and the checks on them; `rules.py` holds the rules across groups. Checks that
need the client's data (delta against 1/n, columns, partition count) run before any training,
beside the data. docs/configuration.md is generated from these dataclasses.
"""

from fed_dp_lora.config.compose import CONF_DIR, compose_config, load_config, to_plain, typed, validate
from fed_dp_lora.config.fields import ConfigError
from fed_dp_lora.config.model import PACKAGED_MODELS
from fed_dp_lora.config.root import RunConfig
from fed_dp_lora.config.sections import ATTACKS
from fed_dp_lora.config.strategy import ROBUST_STRATEGIES, STRATEGIES

__all__ = [
    "ATTACKS",
    "CONF_DIR",
    "ConfigError",
    "PACKAGED_MODELS",
    "ROBUST_STRATEGIES",
    "RunConfig",
    "STRATEGIES",
    "compose_config",
    "load_config",
    "to_plain",
    "typed",
    "validate",
]
