"""The one exception every conversion failure raises: bad input, unsupported model, bad flags."""

from __future__ import annotations


class ConversionError(RuntimeError):
    """A conversion cannot proceed; the message names the file, tensor or config field."""
