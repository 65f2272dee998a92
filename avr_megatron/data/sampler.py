"""Which bins each data-parallel rank trains on at each step: a pure function of (seed, step).

Epoch e visits the bins in a permutation drawn from (seed, e); step s of the run takes global
batch s mod steps_per_epoch of epoch s // steps_per_epoch, and data-parallel rank r takes its
contiguous share of that batch. Nothing is stateful, so resuming at step s (mid-epoch or not)
reproduces exactly the batches an uninterrupted run would have seen, even under another
data-parallel size (the global batch does not depend on it). Bins left over after the last
full global batch of an epoch are not used in that epoch (reshuffling changes which).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class StepSampler:
    num_bins: int
    global_batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.global_batch_size < 1:
            raise ValueError("global_batch_size must be >= 1")
        if self.num_bins < self.global_batch_size:
            raise ValueError(f"the data fill {self.num_bins} bins, fewer than one global batch "
                             f"(train.global_batch_size={self.global_batch_size})")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_bins // self.global_batch_size

    @property
    def unused_per_epoch(self) -> int:
        return self.num_bins - self.steps_per_epoch * self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        return _order(self.num_bins, self.seed, epoch, self.shuffle)

    def global_batch(self, step: int) -> np.ndarray:
        """Bin indices of optimizer step `step` (0-based) across all data-parallel ranks."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = self.global_batch_size
        return self.epoch_order(epoch)[pos * g:(pos + 1) * g]

    def rank_batch(self, step: int, dp_rank: int, dp_size: int) -> np.ndarray:
        if self.global_batch_size % dp_size:
            raise ValueError(f"global batch {self.global_batch_size} is not divisible by the "
                             f"data-parallel size {dp_size}")
        share = self.global_batch_size // dp_size
        return self.global_batch(step)[dp_rank * share:(dp_rank + 1) * share]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


@lru_cache(maxsize=4)
def _order(num_bins: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_bins)
    return np.random.default_rng([seed, epoch]).permutation(num_bins)
