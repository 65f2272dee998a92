"""One optimizer step: zero the gradients, one forward-backward pass of Megatron's schedule over
the step's microbatches (training/schedule.py), then the optimizer and LR-scheduler step unless
the loss or the gradients are not finite. The forward-step function comes from the caller (SFT,
DPO, the smoke run's language model, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from avr_megatron.training.schedule import forward_backward


@dataclass
class StepResult:
    # Mean over microbatches of each metric the loss function reported, averaged over DP ranks
    # (valid on every rank).
    metrics: dict[str, float]
    grad_norm: float | None
    # The learning rate this step used (read before the scheduler moved on).
    lr: float
    # False when the step was skipped: non-finite loss, or inf/nan gradients.
    updated: bool

    @property
    def loss(self) -> float:
        return self.metrics.get("loss", math.nan)


def optimizer_step(optimizer) -> tuple[bool, float | None]:
    """Megatron's ChainedOptimizer.step, skipped when the gradients are not finite. The decision
    uses the global gradient norm that the step computes anyway for clipping (one reduction over
    the gradient-statistics group, identical on every rank, so all ranks skip together); no
    extra pass over the gradient buffers. Megatron's own step would clip with a NaN norm (a
    no-op) and write NaN into the weights. Returns (updated, grad norm).

    Same order as ChainedOptimizer.step for dense models: prepare_grads (fp16 loss-scale overflow
    check; main-grad copies), the norm, clipping with that norm, step_with_ready_grads (which
    also launches the distributed optimizer's parameter all-gather). Per-group norms (MTP
    heads) and grad_norm_skip_threshold are not used by our models."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0 and params:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_step(forward_step: Callable, batches: Sequence, chunks: list[torch.nn.Module],
               optimizer, scheduler, *, seq_length: int, micro_batch_size: int) -> StepResult:
    """One optimizer step over this rank's microbatches of the step. The loss is the same on
    every rank (reduced over DP, broadcast over PP), so a non-finite loss skips the update on
    all ranks together; non-finite gradients are caught by optimizer_step."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(forward_step, batches, chunks, seq_length=seq_length,
                               micro_batch_size=micro_batch_size)
    lr = optimizer.param_groups[0]["lr"]
    updated, grad_norm = False, None
    if math.isfinite(metrics.get("loss", math.nan)):
        updated, grad_norm = optimizer_step(optimizer)
    if updated:
        scheduler.step(increment=1)
    return StepResult(metrics=metrics, grad_norm=grad_norm, lr=lr, updated=updated)
