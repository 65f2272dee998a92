"""SFT: token-level cross-entropy over the assistant-token mask.

The loss function returns (sum of token NLLs, number of trained tokens); with Megatron's
per-token normalisation the gradient is the mean over every trained token of the global batch,
whatever the micro-batching, data-parallel size or packing.
"""

from __future__ import annotations

from functools import partial

import torch

from avr_megatron.data.batches import PackedBatch
from avr_megatron.training.losses.common import SequenceLogprobs, metric, packed_forward, total


class SFTObjective:
    name = "sft"
    data_kind = "sft"
    progress_metrics = ("loss",)

    def __init__(self, *, vocab_size: int, use_te: bool, bf16: bool, chunk_size: int = 0):
        self.logprobs = SequenceLogprobs(vocab_size, chunk_size)
        self.use_te, self.bf16 = use_te, bf16

    def prepare(self, batches: list[PackedBatch]) -> None:
        """Nothing to attach before an SFT step."""

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        output = packed_forward(model, batch, use_te=self.use_te, bf16=self.bf16)
        return output, partial(self.loss, batch)

    def loss(self, batch: PackedBatch, logits: torch.Tensor):
        per_token = self.logprobs.tokens(logits, batch)
        nll = -per_token.sum()
        count = batch.loss_mask.sum().to(torch.int)
        metrics = {"loss": metric(nll, count), "target_tokens": total(count),
                   "sequences": total(batch.num_sequences)}
        return nll, count, metrics
