"""The one exception type for bad recipes and overrides."""


class ConfigError(ValueError):
    """A recipe or override is invalid. The message names the key (e.g. `model.num_layers`)."""
