"""Configuration: a typed dataclass schema, YAML files with ``_base_`` inheritance and
dotted command-line overrides. Imports nothing else of the pipeline."""

from .cli import parse_config_args
from .loader import (
    ConfigError,
    all_keys,
    config_to_dict,
    dump_config,
    field_docs,
    load_config,
    save_config,
)
from .schema import (
    AnchorConfig,
    BackboneConfig,
    Config,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    FocalLossConfig,
    InputConfig,
    ModelConfig,
    RoIHeadsConfig,
    RPNConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "AnchorConfig",
    "BackboneConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EvalConfig",
    "FocalLossConfig",
    "InputConfig",
    "ModelConfig",
    "RPNConfig",
    "RoIHeadsConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "config_to_dict",
    "dump_config",
    "field_docs",
    "load_config",
    "parse_config_args",
    "save_config",
]
