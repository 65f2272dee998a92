"""What SFT and preference objectives share: the packed forward pass and per-sequence log-probs
from the last pipeline stage's vocab-parallel logits."""

from __future__ import annotations

import math

import torch

from avr_megatron.data.batches import PackedBatch, model_inputs
from avr_megatron.runtime.device import device
from avr_megatron.training.logprobs import sequence_sums, token_logprobs


def packed_forward(model, batch: PackedBatch, *, use_te: bool, bf16: bool):
    """Run one packed microbatch through a model chunk. Returns vocab-parallel logits on the
    last pipeline stage (kept in the model's dtype: no fp32 copy of the logits), hidden states
    elsewhere."""
    kwargs = model_inputs(batch, use_te, device())
    if bf16:  # Float16Module would otherwise upcast the whole logits tensor to fp32
        kwargs["fp32_output"] = False
    return model(**kwargs)


def metric(total, count) -> torch.Tensor:
    """A mean metric reported as [sum, count]; the loop sums both over microbatches and
    data-parallel ranks, then divides, so means are over the whole global batch (a mean over
    no observations is NaN)."""
    total = torch.as_tensor(total).detach().double().reshape(())
    return torch.stack([total, torch.as_tensor(count, dtype=torch.float64, device=total.device)])


def total(value) -> torch.Tensor:
    """A metric summed over the global batch (a NaN count marks a total, not a mean)."""
    return metric(value, math.nan)


class SequenceLogprobs:
    """Per-sequence sums of trained-token log-probs (and token counts) of a batch."""

    def __init__(self, vocab_size: int, chunk_size: int):
        self.vocab_size, self.chunk_size = vocab_size, chunk_size

    def tokens(self, logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        labels, mask = batch.labels, batch.loss_mask
        if labels.device != logits.device:
            labels, mask = labels.to(logits.device), mask.to(logits.device)
        return token_logprobs(logits, labels, mask, self.vocab_size, self.chunk_size)

    def sequences(self, logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        per_token = self.tokens(logits, batch)
        return sequence_sums(per_token.reshape(batch.segment.shape),
                             batch.segment.to(per_token.device), batch.num_sequences)
