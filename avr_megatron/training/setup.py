"""Megatron DDP, optimizer and LR schedule for a list of model chunks, from the recipe.

The same objects serve every training stage (SFT, DPO, smoke runs); the step logic that differs
between them is a forward-step function injected into `training.step.train_step`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from avr_megatron.config import AvrConfig
from avr_megatron.config.layout import ParallelLayout, microbatches_per_step


def num_microbatches(cfg: AvrConfig, layout: ParallelLayout) -> int:
    """Micro-batches per optimizer step on each data-parallel rank (config/layout.py's rule)."""
    return microbatches_per_step(cfg, layout.dp)


def overlap_settings(cfg: AvrConfig) -> tuple[bool, bool]:
    """(overlap_grad_reduce, overlap_param_gather) resolved on this machine: the ddp.* keys, or
    when unset, on for GPU runs (param gather only with the distributed optimizer)."""
    from avr_megatron.runtime.device import on_gpu

    d, distopt = cfg.ddp, cfg.optimizer.use_distributed_optimizer
    grad = on_gpu() if d.overlap_grad_reduce is None else d.overlap_grad_reduce
    param = (on_gpu() and distopt) if d.overlap_param_gather is None else d.overlap_param_gather
    return grad, param


def wrap_ddp(chunks: list[torch.nn.Module], cfg: AvrConfig) -> list[torch.nn.Module]:
    """Megatron DistributedDataParallel around each chunk (grad buffers, bucketed all-reduce or
    reduce-scatter for the distributed optimizer), and the hooks the schedules call. With
    overlapped communication the schedules get Megatron-LM's hooks: no_sync (gradients are
    reduced once, after the last microbatch), start_grad_sync per chunk, and under interleaving
    start_param_sync per chunk (param all-gathers aligned across pipeline stages)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from avr_megatron.models.llama import unwrap

    overlap_grad, overlap_param = overlap_settings(cfg)
    interleaved = len(chunks) > 1
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=overlap_param,
        align_param_gather=overlap_param and interleaved,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = unwrap(chunk).config
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config,
                                               module=chunk, disable_bucketing=i > 0))
    config = unwrap(chunks[0]).config

    def per_chunk(name):
        fns = [getattr(c, name) for c in wrapped]
        return fns if interleaved else fns[0]

    config.no_sync_func = per_chunk("no_sync") if overlap_grad else None
    config.grad_sync_func = per_chunk("start_grad_sync") if overlap_grad else None
    config.param_sync_func = per_chunk("start_param_sync") if ddp_config.align_param_gather \
        else None
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


@contextmanager
def params_synced(chunks: list[torch.nn.Module]):
    """The model's parameters as the optimizer last set them. With ddp overlap_param_gather the
    other data-parallel ranks' updated shards arrive lazily, in the next forward pass; a save,
    an export or a read of the weights needs them now. As Megatron-LM does around a save: drop
    the forward pre-hooks (which all-gathers synchronously), then put them back."""
    hooked = [c for c in chunks if getattr(getattr(c, "ddp_config", None),
                                           "overlap_param_gather", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def build_optimizer(chunks: list[torch.nn.Module], cfg: AvrConfig):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from avr_megatron.models.llama import unwrap

    o = cfg.optimizer
    opt_config = OptimizerConfig(
        optimizer=o.name, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=cfg.precision.bf16,
        params_dtype=torch.bfloat16 if cfg.precision.bf16 else torch.float32,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    unwrap(chunks[0]).config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(optimizer, cfg: AvrConfig):
    """Linear warmup to optimizer.lr, then constant / linear / cosine decay to min_lr. Steps are
    counted in optimizer steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, s, t = cfg.optimizer, cfg.scheduler, cfg.train
    decay = s.lr_decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if s.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters, lr_decay_steps=max(decay, s.warmup_iters + 1),
        lr_decay_style=s.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant")
