"""Statistics of `avr eval`: win rates against a baseline (ties count half) with a Wilson score
interval, and mean rewards with a normal-approximation interval. Plain Python, so the numbers
can be checked without torch.

Win rate. Each prompt compares the model's reward with the baseline's reward for that prompt:
a win when the model's is higher by more than `tie_margin`, a loss when lower by more than it,
a tie otherwise. A prompt where only one side has an answer (blank after every try) goes to the
side with the answer; neither: a tie. The rate is (wins + ties / 2) / n.

Interval. The Wilson score interval for a proportion p_hat over n trials at confidence level c,
with z the (1 + c) / 2 quantile of the standard normal:

    centre = (p_hat + z^2 / (2n)) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p_hat (1 - p_hat) / n + z^2 / (4 n^2))

It is the set of p with |p_hat - p| <= z sqrt(p (1 - p) / n) (the score test's acceptance
region). With ties counted as half a win, p_hat is a fractional proportion and the interval an
approximation (slightly wide: ties have less variance than a coin flip).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

from avr_megatron.method.rewards import check_reward


def z_value(confidence: float) -> float:
    """The two-sided standard-normal quantile of a confidence level in (0, 1)."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf((1 + confidence) / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of successes / n (successes may be fractional: ties as half)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected an integer >= 1, got {n!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes: expected a number in [0, {n}], got {successes!r}")
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, centre - half), min(1.0, centre + half)


def outcome(model: float | None, baseline: float | None, tie_margin: float = 0.0) -> str:
    """'win' | 'tie' | 'loss' of one prompt (None: that side has no answer)."""
    if model is None and baseline is None:
        return "tie"
    if model is None:
        return "loss"
    if baseline is None:
        return "win"
    diff = check_reward(model, "model reward") - check_reward(baseline, "baseline reward")
    if diff > tie_margin:
        return "win"
    if diff < -tie_margin:
        return "loss"
    return "tie"


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int
    rate: float
    low: float
    high: float
    confidence: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict:
        return {**asdict(self), "n": self.n, "method": "wilson, ties count half"}


def win_rate(model: Sequence[float | None], baseline: Sequence[float | None], *, tie_margin: float = 0.0,
             confidence: float = 0.95) -> WinRate:
    """Win rate of paired per-prompt rewards (same order, same length)."""
    if len(model) != len(baseline):
        raise ValueError(f"win_rate: {len(model)} model rewards but {len(baseline)} baseline rewards")
    if not model:
        raise ValueError("win_rate: no prompts")
    if tie_margin < 0:
        raise ValueError(f"tie_margin: expected a number >= 0, got {tie_margin!r}")
    counts = {"win": 0, "tie": 0, "loss": 0}
    for m, b in zip(model, baseline):
        counts[outcome(m, b, tie_margin)] += 1
    n = len(model)
    score = counts["win"] + counts["tie"] / 2
    low, high = wilson_interval(score, n, confidence)
    return WinRate(counts["win"], counts["tie"], counts["loss"], score / n, low, high, confidence)


@dataclass(frozen=True)
class MeanReward:
    n: int
    mean: float | None
    # Sample standard deviation (n - 1); None below 2 values.
    std: float | None
    low: float | None
    high: float | None
    confidence: float

    def to_dict(self) -> dict:
        return {**asdict(self), "method": "normal approximation, mean +- z * std / sqrt(n)"}


def mean_reward(rewards: Sequence[float | None], confidence: float = 0.95) -> MeanReward:
    """Mean of the rewards that exist (None: no answer) with mean +- z * s / sqrt(n)."""
    z = z_value(confidence)
    values = [check_reward(r, f"rewards[{i}]") for i, r in enumerate(rewards) if r is not None]
    n = len(values)
    if n == 0:
        return MeanReward(0, None, None, None, None, confidence)
    mean = math.fsum(values) / n
    if n < 2:
        return MeanReward(n, mean, None, None, None, confidence)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * std / math.sqrt(n)
    return MeanReward(n, mean, std, mean - half, mean + half, confidence)
