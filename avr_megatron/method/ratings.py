"""Read the `[[n]]` rating (1..10) that ends a criticism; a criticism without one is resampled."""

from __future__ import annotations

import re
from typing import Any

# Exactly `[[n]]` with n an integer 1..10 written without sign, decimals, spaces or leading zeros.
_RATING = re.compile(r"\[\[(10|[1-9])\]\]")


def extract_rating(text: Any) -> int | None:
    """The last valid `[[n]]` in `text` (the verdict comes at the end), or None. Never raises."""
    if not isinstance(text, str):
        return None
    last = None
    for match in _RATING.finditer(text):
        last = match
    return int(last.group(1)) if last is not None else None
