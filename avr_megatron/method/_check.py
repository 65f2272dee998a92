"""Field checks shared by the `from_dict` loaders: every failure names the record and field."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def mapping(d: Any, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> Mapping[str, Any]:
    """`d` is a mapping holding every required key and nothing beyond required + optional."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    required = tuple(required)
    known = set(required) | set(optional)
    for key in d:
        if key not in known:
            raise ValueError(f"{where}.{key}: unknown field")
    for key in required:
        if key not in d:
            raise ValueError(f"{where}.{key}: missing")
    return d


def integer(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: expected an integer >= {minimum}, got {value}")
    return value


def number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def optional_integer(value: Any, where: str, *, minimum: int | None = None) -> int | None:
    return None if value is None else integer(value, where, minimum=minimum)


def optional_number(value: Any, where: str) -> float | None:
    return None if value is None else number(value, where)


def optional_string(value: Any, where: str) -> str | None:
    return None if value is None else string(value, where)


def sequence(value: Any, where: str) -> list[Any]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def counters(value: Any, where: str) -> dict[str, int]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping of counts, got {type(value).__name__}")
    return {string(k, f"{where} key"): integer(v, f"{where}.{k}", minimum=0) for k, v in value.items()}
