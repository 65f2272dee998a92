"""Refinement-aware ("differential") rewards: an improvement is worth what it adds over the answer
it refines, and a criticism is worth the mean improvement it leads to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_reward(value: Any, where: str) -> float:
    """A reward-model score: a finite real number (bool is refused: it is an int in Python)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return value


def improvement_reward(r_new: float, r_old: float) -> float:
    """R = r(x, y_{t+1}) - r(x, y_t): positive when the refinement helped."""
    return check_reward(r_new, "r_new") - check_reward(r_old, "r_old")


def criticism_value(child_rewards: Sequence[float], parent_reward: float) -> float | None:
    """Value of a criticism c of y_t: the mean improvement reward of the answers sampled from it,

        value(c) = (1/m) * sum_j [ r(x, y_{t+1}^j) - r(x, y_t) ]   over its m scored children.

    For a fixed parent y_t this is the mean child reward minus r(x, y_t), so ranking criticisms by
    mean child reward (the note) and by mean improvement reward is the same ranking, and the gap
    between two criticisms of one parent is the same under both. A criticism with no scored child
    has no value: returns None (callers leave it out of rankings) rather than guessing 0.
    """
    parent = check_reward(parent_reward, "parent_reward")
    if isinstance(child_rewards, (str, bytes)) or not isinstance(child_rewards, Sequence):
        raise ValueError(f"child_rewards: expected a list of numbers, got {type(child_rewards).__name__}")
    if not child_rewards:
        return None
    gains = [check_reward(r, f"child_rewards[{i}]") - parent for i, r in enumerate(child_rewards)]
    return math.fsum(gains) / len(gains)


def argmax(values: Sequence[float]) -> int | None:
    """Index of the largest value, the first one on ties (None for an empty list)."""
    best = None
    for i, v in enumerate(values):
        if best is None or v > values[best]:
            best = i
    return best


def argmin(values: Sequence[float], exclude: int | None = None) -> int | None:
    """Index of the smallest value other than `exclude`, the first one on ties."""
    worst = None
    for i, v in enumerate(values):
        if i != exclude and (worst is None or v < values[worst]):
            worst = i
    return worst
