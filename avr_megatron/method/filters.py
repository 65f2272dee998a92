"""Data filters of the note: degenerate repetition (every preference pair) and the RSFT length
filter. Each returns a reason string or None, so the driver can count acceptance per filter."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any, Mapping

REPETITION = "repetition"
LENGTH = "length"

# The authors' degenerate-text check, exactly (reference behaviour):
# (a) remove the spaces (only " "), then every maximal run of digits / non-word characters
#     (`[\d\W]+`, so newlines and other whitespace count) is a token;
# (b) a text with a Latin letter (a-z, A-Z) is split into words `\b\w+\b` of its lowercased form;
#     any other text (CJK, digits and symbols only) into single characters, spaces included.
# A text is degenerate when any token of (a) or of (b) occurs `repetition_threshold` times or more.
_DIGIT_SYMBOL_RUN = re.compile(r"[\d\W]+")
_LATIN = re.compile(r"[a-zA-Z]")
_WORD = re.compile(r"\b\w+\b")


@dataclass(frozen=True)
class FilterConfig:
    # A text is degenerate when one digit/symbol run or word (character, for text without Latin
    # letters) occurs this many times or more (the reference: 60).
    repetition_threshold: int = 60
    # RSFT: drop an improvement that is BOTH this many characters longer than y0 ...
    length_extra_chars: int = 400
    # ... AND at least this many times as long as y0.
    length_ratio: float = 1.2

    def __post_init__(self) -> None:
        problems = filter_problems(asdict(self))
        if problems:
            raise ValueError(problems[0])

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str = "filters") -> FilterConfig:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        for key in d:
            if key not in names:
                raise ValueError(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
        problems = filter_problems({**asdict(cls()), **d}, where)
        if problems:
            raise ValueError(problems[0])
        return replace(cls(), **dict(d))

    @classmethod
    def from_section(cls, section: Any, where: str = "filters") -> FilterConfig:
        """From a recipe section holding these fields (synth.filters, which has more)."""
        return cls.from_dict({f.name: getattr(section, f.name) for f in fields(cls)
                              if hasattr(section, f.name)}, where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filter_problems(values: Mapping[str, Any], where: str = "filters") -> list[str]:
    """The rules of FilterConfig's fields, each message naming `where`.<field>."""
    errs = []
    for name in ("repetition_threshold", "length_extra_chars"):
        value = values.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errs.append(f"{where}.{name}: expected an integer >= 1, got {value!r}")
    ratio = values.get("length_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        errs.append(f"{where}.length_ratio: expected a positive number, got {ratio!r}")
    return errs


def _most_common(tokens: list[str]) -> tuple[str, int] | None:
    counts = Counter(tokens)
    if not counts:
        return None
    return max(counts.items(), key=lambda item: (item[1], item[0]))


def most_repeated(text: str) -> tuple[str, int] | None:
    """The most frequent token of `text` under either rule of the check (see above) and its count
    (None if the text has no token): a digit/symbol run, a word, or a character."""
    runs = _most_common(_DIGIT_SYMBOL_RUN.findall(text.replace(" ", "")))
    words = _most_common(_WORD.findall(text.lower()) if _LATIN.search(text) else list(text))
    found = [t for t in (runs, words) if t is not None]
    return max(found, key=lambda item: item[1]) if found else None


def repetition_reason(text: str, config: FilterConfig = FilterConfig()) -> str | None:
    """`"repetition"` when some digit/symbol run, word (or, for text without Latin letters,
    character) occurs >= `repetition_threshold` times."""
    if not isinstance(text, str):
        raise ValueError(f"repetition filter: expected a string, got {type(text).__name__}")
    top = most_repeated(text)
    return REPETITION if top is not None and top[1] >= config.repetition_threshold else None


def length_reason(improvement: str, y0: str, config: FilterConfig = FilterConfig()) -> str | None:
    """`"length"` when the improvement is both >= `length_extra_chars` characters longer and
    >= `length_ratio` times as long as y0 (lengths in characters; the ratio compared exactly, as the
    decimal written in the recipe)."""
    for name, value in (("improvement", improvement), ("y0", y0)):
        if not isinstance(value, str):
            raise ValueError(f"length filter: {name}: expected a string, got {type(value).__name__}")
    new, old = len(improvement), len(y0)
    ratio = Fraction(repr(float(config.length_ratio)))
    if new - old >= config.length_extra_chars and new >= ratio * old:
        return LENGTH
    return None
