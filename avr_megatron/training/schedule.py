"""The one place that drives Megatron's pipeline schedule (no PP, 1F1B or interleaved): a
forward(-backward) pass over one step's microbatches on this rank, for training (the train step
adds zero-grad and the optimizer step: training/step.py), validation, reference log-probs and
the smoke run; and how the reported metrics are reduced over microbatches and ranks.

The caller supplies Megatron's forward-step function (data iterator, model) -> (output,
loss_func) and the microbatches as a list; every model chunk (virtual pipeline stage) reads its
own iterator over the same list, as Megatron's interleaved schedule expects.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from avr_megatron.runtime.device import device


def schedule_shape(seq_length: int, bins_per_microbatch: int, use_te: bool) -> tuple[int, int]:
    """(seq_length, micro_batch_size) as Megatron's schedules see one packed microbatch: the
    THD path flattens the bins into one row."""
    return (seq_length * bins_per_microbatch, 1) if use_te else (seq_length, bins_per_microbatch)


def schedule_microbatches(n: int, pipeline_size: int, interleaved: bool) -> int:
    """How many microbatches to run for n real ones. Megatron's interleaved (virtual pipeline)
    schedule accepts only a multiple of the pipeline size, and at least the pipeline size
    (microbatch_group_size_per_vp_stage = PP: pipeline_parallel/schedules.py); the other
    schedules take any count."""
    if not interleaved or pipeline_size == 1 or n == 0:
        return n
    return max(pipeline_size, -(-n // pipeline_size) * pipeline_size)


def run_schedule(forward_step: Callable, batches: Sequence, chunks: list[torch.nn.Module], *,
                 seq_length: int, micro_batch_size: int,
                 forward_only: bool = False) -> list[dict]:
    """One pass of Megatron's schedule over `batches` (this rank's microbatches of one step);
    seq_length and micro_batch_size are the schedule's view of one microbatch (schedule_shape).

    Training (forward_only=False): gradients of all microbatches are accumulated and, through
    the DDP chunks' finalize_model_grads, reduced and normalised; the count must suit the
    schedule (validated with the config). Forward only (validation, reference log-probs): runs
    under no_grad, and a count the interleaved schedule refuses is padded with repeats of the
    last batch whose outputs are dropped.

    Returns what the loss function reported for each real microbatch, in order, on the last
    pipeline stage (an empty list on the others)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    n = len(batches)
    if forward_only:
        m = schedule_microbatches(n, parallel_state.get_pipeline_model_parallel_world_size(),
                                  len(chunks) > 1)
        batches += batches[-1:] * (m - n)
    iters = [iter(batches) for _ in chunks]
    with torch.no_grad() if forward_only else nullcontext():
        out = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters if len(chunks) > 1 else iters[0], model=chunks,
            num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=forward_only)
    return list(out[:n])


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


def forward_backward(forward_step: Callable, batches: Sequence, chunks: list[torch.nn.Module],
                     *, seq_length: int, micro_batch_size: int,
                     forward_only: bool = False) -> dict[str, float]:
    """run_schedule, then reduce_metrics: the step's metrics, valid on every rank."""
    return reduce_metrics(run_schedule(forward_step, batches, chunks, seq_length=seq_length,
                                       micro_batch_size=micro_batch_size,
                                       forward_only=forward_only))
