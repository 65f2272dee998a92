"""Packing keeps every unit whole and within capacity; the sampler is a deterministic function
of the step, sharded over data-parallel ranks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avr_megatron.data.packing import one_per_bin, pack_best_fit_decreasing
from avr_megatron.data.sampler import StepSampler


def _first_fit_decreasing(lengths, capacity):
    bins = []
    for n in sorted(lengths, reverse=True):
        for b in bins:
            if b[0] + n <= capacity:
                b[0] += n
                break
        else:
            bins.append([n])
    return len(bins)


def _reference_best_fit_decreasing(lengths, capacity):
    """The plain algorithm: units longest first (ties by index), each into the open bin with
    the least room that fits it (ties: the lowest bin index), else a new bin."""
    bins, room = [], []
    for u in sorted(range(len(lengths)), key=lambda u: (-lengths[u], u)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[u]]
        if fits:
            b = min(fits, key=lambda b: (room[b], b))
            bins[b].append(u)
            room[b] -= lengths[u]
        else:
            bins.append([u])
            room.append(capacity - lengths[u])
    return bins


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=150), st.integers(64, 128))
def test_best_fit_decreasing_matches_the_plain_algorithm(lengths, capacity):
    plan = pack_best_fit_decreasing(np.asarray(lengths), capacity)
    assert [plan.bin(b).tolist() for b in range(plan.num_bins)] == \
        _reference_best_fit_decreasing(lengths, capacity)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=120), st.integers(64, 128))
def test_best_fit_decreasing_is_valid_and_no_worse_than_ffd(lengths, capacity):
    lengths = np.asarray(lengths)
    plan = pack_best_fit_decreasing(lengths, capacity)
    assert sorted(plan.units.tolist()) == list(range(len(lengths)))  # each unit exactly once
    for b in range(plan.num_bins):
        assert lengths[plan.bin(b)].sum() == plan.fill[b] <= capacity
    assert plan.num_bins >= -(-lengths.sum() // capacity)
    assert plan.num_bins <= _first_fit_decreasing(lengths.tolist(), capacity)
    assert plan.efficiency == pytest.approx(lengths.sum() / (plan.num_bins * capacity))


def test_packing_deterministic_and_unpacked_plan():
    lengths = np.random.default_rng(0).integers(5, 60, 500)
    a, b = pack_best_fit_decreasing(lengths, 128), pack_best_fit_decreasing(lengths, 128)
    assert np.array_equal(a.units, b.units) and np.array_equal(a.offsets, b.offsets)
    assert a.efficiency > 0.97
    flat = one_per_bin(lengths, 128)
    assert flat.num_bins == 500 and flat.efficiency == pytest.approx(lengths.sum() / 500 / 128)
    with pytest.raises(ValueError, match="exceeds the bin capacity"):
        pack_best_fit_decreasing(np.array([10, 200]), 128)


def test_sampler_shards_resumes_and_covers_epochs():
    s = StepSampler(num_bins=50, global_batch_size=8, seed=3)
    assert s.steps_per_epoch == 6 and s.unused_per_epoch == 2
    for step in range(20):
        g = s.global_batch(step)
        parts = [s.rank_batch(step, r, 4) for r in range(4)]
        assert np.array_equal(np.concatenate(parts), g)
        assert np.array_equal(np.concatenate([s.rank_batch(step, r, 2) for r in range(2)]), g)
    epoch0 = np.concatenate([s.global_batch(i) for i in range(6)])
    assert len(set(epoch0.tolist())) == 48  # no bin twice within an epoch
    assert not np.array_equal(s.global_batch(0), s.global_batch(6))  # reshuffled next epoch
    # A fresh sampler (a resumed run) gives the same batches at any step.
    t = StepSampler(num_bins=50, global_batch_size=8, seed=3)
    assert all(np.array_equal(s.global_batch(i), t.global_batch(i)) for i in (0, 7, 13))
    assert not np.array_equal(StepSampler(50, 8, seed=4).global_batch(0), s.global_batch(0))
    assert np.array_equal(StepSampler(50, 8, 3, shuffle=False).global_batch(1), np.arange(8, 16))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(num_bins=5, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 3"):
        s.rank_batch(0, 0, 3)
