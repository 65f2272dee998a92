"""One optimizer step through Megatron's forward-backward schedule (no PP, 1F1B or interleaved),
with the forward-step function supplied by the caller (SFT, DPO, ...)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from avr_megatron.runtime.device import device


@dataclass
class StepResult:
    # Mean over microbatches of each metric the loss function reported, averaged over DP ranks
    # (valid on every rank).
    metrics: dict[str, float]
    grad_norm: float | None
    lr: float
    # False when the optimizer skipped the update (inf/nan gradients).
    updated: bool


def _as_sum_count(value: torch.Tensor) -> torch.Tensor:
    """A reported metric as [sum, count] (float64, on this process's device): a scalar is one
    observation (sum=value, count=1); a 2-element tensor already is [sum, count] (count NaN: a
    total, reported as the sum; count 0: a mean over nothing, reported as NaN)."""
    value = torch.as_tensor(value).detach().to(device=device(), dtype=torch.float64).reshape(-1)
    if value.numel() == 1:
        return torch.cat([value, torch.ones(1, dtype=torch.float64, device=value.device)])
    if value.numel() != 2:
        raise ValueError(f"a metric must be a scalar or [sum, count], got {value.numel()} values")
    return value


def reduce_metrics(reported: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Sum each metric's [sum, count] over this rank's microbatches and the data-parallel ranks,
    then divide (scalar metrics: the mean over microbatches and ranks). Every rank must report
    the same names (a loss function reports each of its metrics for every batch). One device
    reduction and one copy to the host per step. Only the last pipeline stage computed them; it
    broadcasts the result to the other stages."""
    from megatron.core import parallel_state

    names = sorted(reported[0]) if reported else []
    result: dict[str, float] = {}
    if reported:
        sums = torch.stack([torch.stack([_as_sum_count(r[k]) for k in names])
                            for r in reported]).sum(0)  # [metrics, 2]
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        for name, (total, count) in zip(names, sums.tolist()):
            result[name] = total if math.isnan(count) else (total / count if count else math.nan)
    # PP: ship names and values from the last stage to the others.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        payload = [result if reported else None]
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(payload, src=last,
                                   group=parallel_state.get_pipeline_model_parallel_group())
        return payload[0]
    return result


def forward_backward(forward_step: Callable, data_iterator: Iterator | list[Iterator],
                     chunks: list[torch.nn.Module], *, num_microbatches: int, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False) -> dict[str, float]:
    """Megatron's schedule over the microbatches (gradients are accumulated and, unless
    forward_only, reduced and normalised by finalize_model_grads); returns reduced metrics."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reported = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
    return reduce_metrics(reported)


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


def train_step(forward_step: Callable, data_iterator: Iterator | list[Iterator],
               chunks: list[torch.nn.Module], optimizer, scheduler, *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int) -> StepResult:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = forward_backward(forward_step, data_iterator, chunks,
                               num_microbatches=num_microbatches, seq_length=seq_length,
                               micro_batch_size=micro_batch_size)
    updated, grad_norm = optimizer_step(optimizer)
    if updated:
        scheduler.step(increment=1)
    return StepResult(metrics=metrics, grad_norm=grad_norm,
                      lr=optimizer.param_groups[0]["lr"], updated=updated)
