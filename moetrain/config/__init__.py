"""One typed config tree for everything: YAML in, dotted overrides, validate().

Every field carries a docstring (the string literal under it). Unknown keys fail
naming the closest valid key; `validate()` rejects impossible combinations with
one line before any work starts. The tree is in schema.py, YAML/dict handling in
mapping.py, the checks in validate.py; import everything from here.
"""
from __future__ import annotations

import os
from typing import Optional

import yaml

from moetrain.config.mapping import (ConfigError, _from_dict, _set_dotted, from_mapping, parse_override,
                                     read_yaml_mapping, register_list_items, to_dict)
from moetrain.config.schema import (AttentionConfig, CheckpointConfig, DataConfig, DeepSpeedConfig,
                                    EvalConfig, ExportConfig, LoggingConfig, ModelConfig, MoEConfig,
                                    OptimConfig, RopeConfig, StageConfig, TrainConfig, TrainSection,
                                    WandbConfig)
from moetrain.config.validate import (ATTENTION_KINDS, ROPE_TYPES, grad_accum_for, head_dim, stage_attention,
                                      stage_data, validate)


__all__ = ["ATTENTION_KINDS", "ROPE_TYPES", "AttentionConfig", "CheckpointConfig", "ConfigError", "DataConfig",
           "DeepSpeedConfig", "EvalConfig", "ExportConfig", "LoggingConfig", "ModelConfig", "MoEConfig",
           "OptimConfig", "RopeConfig", "StageConfig", "TrainConfig", "TrainSection", "WandbConfig",
           "config_from_dict", "dump_yaml", "from_mapping", "grad_accum_for", "head_dim", "load_config", "parse_override",
           "read_yaml_mapping", "register_list_items", "stage_attention", "stage_data", "to_dict", "validate"]


def config_from_dict(data: dict, overrides=()) -> TrainConfig:
    tree = dict(data)
    for ov in overrides:
        key, value = parse_override(ov) if isinstance(ov, str) else ov
        _set_dotted(tree, key, value)
    return _from_dict(TrainConfig, tree)


def load_config(path: Optional[str] = None, overrides=()) -> TrainConfig:
    """Load YAML (or defaults when `path` is None), apply dotted overrides, validate."""
    data = read_yaml_mapping(path) if path else {}
    if path and "name" not in data:
        data["name"] = os.path.splitext(os.path.basename(path))[0]
    cfg = config_from_dict(data, overrides)
    validate(cfg)
    return cfg


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
