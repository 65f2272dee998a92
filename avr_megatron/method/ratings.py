"""Read the `[[n]]` rating (1..10) of a criticism; a criticism without one is resampled.

Two readings (`synth.rating_parse`):
- "first" (the authors' reference): the first `[[digits]]` in the text is the rating; it counts
  when its value is 1..10 (`[[05]]` reads as 5), otherwise the criticism has no rating, whatever
  follows it.
- "last": the last `[[n]]` with n written exactly as 1..10 (no sign, decimals, spaces or leading
  zeros); other bracketed numbers are ignored.
"""

from __future__ import annotations

import re
from typing import Any

RATING_PARSES = ("first", "last")

_FIRST = re.compile(r"\[\[(\d+)\]\]")
_EXACT = re.compile(r"\[\[(10|[1-9])\]\]")


def extract_rating(text: Any, parse: str = "first") -> int | None:
    """The criticism's rating under `parse` ("first" or "last"), or None. Never raises on text."""
    if parse not in RATING_PARSES:
        raise ValueError(f"rating parse: expected one of {', '.join(RATING_PARSES)}, got {parse!r}")
    if not isinstance(text, str):
        return None
    if parse == "first":
        match = _FIRST.search(text)
        if match is None:
            return None
        value = int(match.group(1))
        return value if 1 <= value <= 10 else None
    last = None
    for match in _EXACT.finditer(text):
        last = match
    return int(last.group(1)) if last is not None else None
