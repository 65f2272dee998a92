"""One optimizer step through Megatron's forward-backward schedule (no PP, 1F1B or interleaved),
with the forward-step function supplied by the caller (SFT, DPO, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist


@dataclass
class StepResult:
    # Mean over microbatches of each metric the loss function reported, averaged over DP ranks
    # (valid on every rank).
    metrics: dict[str, float]
    grad_norm: float | None
    lr: float
    # False when the optimizer skipped the update (inf/nan gradients).
    updated: bool


def _reduce_metrics(reported: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average the last pipeline stage's per-microbatch metrics, then broadcast them to all
    ranks (the last stage is the only one that computed them)."""
    from megatron.core import parallel_state

    names = sorted(reported[0]) if reported else []
    values = torch.zeros(0)
    if reported:
        values = torch.stack([torch.stack([r[k].detach().float().reshape(()) for k in names])
                              for r in reported]).mean(0)
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= parallel_state.get_data_parallel_world_size()
    # PP: ship names and values from the last stage to the others.
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        payload = [(names, values.tolist()) if reported else None]
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(payload, src=last,
                                   group=parallel_state.get_pipeline_model_parallel_group())
        names, vals = payload[0]
        return dict(zip(names, vals))
    return dict(zip(names, values.tolist()))


def train_step(forward_step: Callable, data_iterator: Iterator | list[Iterator],
               chunks: list[torch.nn.Module], optimizer, scheduler, *, num_microbatches: int,
               seq_length: int, micro_batch_size: int, global_batch_size: int) -> StepResult:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reported = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return StepResult(metrics=_reduce_metrics(reported),
                      grad_norm=None if grad_norm is None else float(grad_norm),
                      lr=optimizer.param_groups[0]["lr"], updated=bool(updated))
