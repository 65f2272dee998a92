"""Validation during training: the objective's loss and metrics on held-out data (data.valid),
forward only, every train.eval_interval steps and after the last one.

The validation bins are taken in order (no shuffling), up to train.eval_iters global batches,
dealt round-robin to the data-parallel ranks; every rank runs the same number of microbatches,
the last ones filled up with empty rows. Each metric is summed as [sum, count] over every
microbatch and rank before dividing, so the result is the mean over the validation pairs
(tokens for SFT) whatever the layout: eval/loss, and for DPO eval/rewards/accuracies,
eval/rewards/margins, eval/rewards/chosen, ... (TRL's metric names under eval/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from avr_megatron.data.batches import collate
from avr_megatron.data.dataset import TrainingData


@dataclass
class Validation:
    data: TrainingData
    # Attaches what the objective needs to validation batches (reference log-probs of the
    # validation pairs for DPO).
    prepare: Callable


def validation_bins(num_bins: int, global_batch_size: int, eval_iters: int | None) -> np.ndarray:
    n = num_bins if eval_iters is None else min(num_bins, eval_iters * global_batch_size)
    return np.arange(n)


def rank_microbatches(bins: np.ndarray, dp_rank: int, dp: int, mbs: int) -> list[np.ndarray]:
    """This rank's share of the bins as microbatches of mbs rows; every rank gets the same
    number of microbatches (-1: an empty row)."""
    per_rank = -(-len(bins) // dp)
    n_mb = max(1, -(-per_rank // mbs))
    mine = np.full(n_mb * mbs, -1, dtype=np.int64)
    share = bins[dp_rank::dp]
    mine[:len(share)] = share
    return [mine[i:i + mbs] for i in range(0, len(mine), mbs)]


def evaluate(objective, chunks, validation: Validation, *, global_batch_size: int,
             micro_batch_size: int, eval_iters: int | None, dp_rank: int, dp: int,
             seq_length: int, schedule_micro_batch_size: int,
             microbatches_per_call: int) -> dict[str, float]:
    """{"eval/<metric>": value} over the validation set (valid on every rank)."""
    from avr_megatron.training.schedule import reduce_metrics, run_schedule

    v = validation.data
    bins = validation_bins(v.plan.num_bins, global_batch_size, eval_iters)
    microbatches = rank_microbatches(bins, dp_rank, dp, micro_batch_size)
    reported: list[dict] = []
    for chunk in chunks:
        chunk.eval()
    try:
        for start in range(0, len(microbatches), microbatches_per_call):
            batches = [collate(v.data, v.plan, mb, v.chat.pad_id)
                       for mb in microbatches[start:start + microbatches_per_call]]
            validation.prepare(batches)
            reported += run_schedule(objective.forward_step, batches, chunks,
                                     seq_length=seq_length,
                                     micro_batch_size=schedule_micro_batch_size,
                                     forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()
    return {f"eval/{k}": v for k, v in reduce_metrics(reported).items()}
