"""Typed configuration: YAML with inheritance, dotted overrides, validation before launch."""

from megatron_video.config.loader import ConfigError, field_docs, to_dict
from megatron_video.config.schema import (
    ExperimentConfig,
    ParallelConfig,
    RuntimeConfig,
    ShapeConfig,
    build_config,
    load_config,
)

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "ParallelConfig",
    "RuntimeConfig",
    "ShapeConfig",
    "build_config",
    "field_docs",
    "load_config",
    "to_dict",
]
