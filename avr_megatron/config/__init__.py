"""Recipes: omegaconf YAML files loaded into typed dataclass configs (no torch import)."""

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.loader import load_config, save_config, to_yaml
from avr_megatron.config.schema import AvrConfig

__all__ = ["AvrConfig", "ConfigError", "load_config", "save_config", "to_yaml"]
