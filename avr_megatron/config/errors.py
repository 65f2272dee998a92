"""The exception types for bad recipes and overrides, and for bad conversion input (the
HF config.json reader in config/hf_model.py raises the latter, without importing conversion/)."""


class ConfigError(ValueError):
    """A recipe or override is invalid. The message names the key (e.g. `model.num_layers`)."""


class ConversionError(RuntimeError):
    """A conversion cannot proceed; the message names the file, tensor or config field."""
