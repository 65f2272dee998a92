import math

import pytest
from hypothesis import given, settings, strategies as st

from avr_megatron.method.rewards import argmax, argmin, check_reward, criticism_value, improvement_reward


def test_improvement_reward():
    assert improvement_reward(1.5, 0.5) == 1.0
    assert improvement_reward(-1, 2) == -3.0
    with pytest.raises(ValueError, match="^r_new: expected a finite number"):
        improvement_reward(float("nan"), 0)
    with pytest.raises(ValueError, match="^r_old: expected a number, got bool"):
        improvement_reward(1.0, True)


def test_criticism_value_is_mean_improvement_reward():
    assert criticism_value([3.0, 1.0], 1.0) == pytest.approx(1.0)
    assert criticism_value([0.0], 2.0) == -2.0
    assert criticism_value([], 0.0) is None  # no scored child: no value
    with pytest.raises(ValueError, match=r"^child_rewards\[1\]"):
        criticism_value([1.0, "2"], 0.0)
    with pytest.raises(ValueError, match="^child_rewards: expected a list"):
        criticism_value(1.0, 0.0)


finite = st.floats(-100, 100, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(finite, min_size=1, max_size=4), min_size=2, max_size=4), finite)
def test_ranking_by_mean_child_reward_equals_ranking_by_value(groups, parent):
    values = [criticism_value(g, parent) for g in groups]
    means = [math.fsum(g) / len(g) for g in groups]
    for i in range(len(groups)):
        for j in range(len(groups)):
            if abs(means[i] - means[j]) > 1e-9:
                assert (values[i] > values[j]) == (means[i] > means[j])


def test_argmax_argmin_first_on_ties():
    assert argmax([1, 3, 3]) == 1
    assert argmin([2, 1, 1]) == 1
    assert argmin([2, 2], exclude=0) == 1
    assert argmax([]) is None and argmin([5], exclude=0) is None


def test_check_reward():
    assert check_reward(3, "r") == 3.0
    with pytest.raises(ValueError, match="^r: expected a finite number, got inf"):
        check_reward(float("inf"), "r")
