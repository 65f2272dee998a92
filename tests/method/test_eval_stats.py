"""Eval statistics against independent references: the Wilson interval by brute-force inversion of
the score test, win/tie/loss by hand, the mean interval from the statistics module."""

import math
import random
import statistics

import pytest

from avr_megatron.method.eval_stats import mean_reward, outcome, wilson_interval, win_rate, z_value


def brute_force_score_interval(p_hat: float, n: int, z: float, steps: int = 200_001) -> tuple[float, float]:
    """The set of p in [0, 1] the score test accepts: |p_hat - p| <= z sqrt(p (1 - p) / n), on a grid."""
    accepted = [i / (steps - 1) for i in range(steps)
                if abs(p_hat - i / (steps - 1)) <= z * math.sqrt((i / (steps - 1)) * (1 - i / (steps - 1)) / n) + 1e-15]
    return min(accepted), max(accepted)


def test_z_value_matches_known_quantiles():
    assert z_value(0.95) == pytest.approx(1.959963984540054, abs=1e-9)
    assert z_value(0.90) == pytest.approx(1.6448536269514722, abs=1e-9)
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="confidence"):
            z_value(bad)


@pytest.mark.parametrize("successes,n", [(0, 5), (5, 5), (3, 10), (7.5, 12), (1, 1), (40, 100), (0.5, 3)])
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_wilson_interval_is_the_inverted_score_test(successes, n, confidence):
    low, high = wilson_interval(successes, n, confidence)
    ref_low, ref_high = brute_force_score_interval(successes / n, n, z_value(confidence))
    grid = 1 / 200_000
    assert low == pytest.approx(ref_low, abs=2 * grid)
    assert high == pytest.approx(ref_high, abs=2 * grid)
    assert 0 <= low <= successes / n <= high <= 1


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError, match="n"):
        wilson_interval(1, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(6, 5)


def test_outcome_rules():
    assert outcome(1.0, 0.5) == "win"
    assert outcome(0.5, 1.0) == "loss"
    assert outcome(1.0, 1.0) == "tie"
    assert outcome(1.0, 0.95, tie_margin=0.1) == "tie"
    assert outcome(1.0, 0.85, tie_margin=0.1) == "win"
    assert outcome(None, 0.0) == "loss"
    assert outcome(0.0, None) == "win"
    assert outcome(None, None) == "tie"


def test_win_rate_counts_ties_as_half_and_matches_a_hand_count():
    rng = random.Random(0)
    model = [rng.choice([0.0, 1.0, 2.0, None]) for _ in range(57)]
    base = [rng.choice([0.0, 1.0, 2.0, None]) for _ in range(57)]
    wins = ties = losses = 0
    for m, b in zip(model, base):
        mv = -math.inf if m is None else m
        bv = -math.inf if b is None else b
        if mv > bv:
            wins += 1
        elif mv < bv:
            losses += 1
        else:
            ties += 1
    wr = win_rate(model, base, confidence=0.9)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (wins, ties, losses, 57)
    assert ties > 0 and wr.rate == pytest.approx((wins + ties / 2) / 57)
    assert (wr.low, wr.high) == pytest.approx(brute_force_score_interval(wr.rate, 57, z_value(0.9)), abs=2e-5)
    d = wr.to_dict()
    assert d["n"] == 57 and "wilson" in d["method"]


def test_win_rate_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 model rewards but 1"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no prompts"):
        win_rate([], [])


def test_mean_reward_matches_statistics_module():
    values = [0.3, -1.2, 2.5, 0.0, 0.7, None, 1.1]
    present = [v for v in values if v is not None]
    m = mean_reward(values, 0.95)
    half = 1.959963984540054 * statistics.stdev(present) / math.sqrt(len(present))
    assert m.n == 6
    assert m.mean == pytest.approx(statistics.fmean(present), abs=1e-12)
    assert m.std == pytest.approx(statistics.stdev(present), abs=1e-12)
    assert (m.low, m.high) == pytest.approx((m.mean - half, m.mean + half), abs=1e-9)
    one = mean_reward([None, 2.0])
    assert (one.n, one.mean, one.low) == (1, 2.0, None)
    assert mean_reward([None]).mean is None
    with pytest.raises(ValueError, match=r"rewards\[0\]"):
        mean_reward([float("nan")])
