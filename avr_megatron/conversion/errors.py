"""The one exception every conversion failure raises: bad input, unsupported model, bad flags.
Defined in config/errors.py (the torch-free HF config.json reader raises it too)."""

from __future__ import annotations

from avr_megatron.config.errors import ConversionError

__all__ = ["ConversionError"]
