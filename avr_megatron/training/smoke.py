"""A self-contained Megatron training run on synthetic data: checks an install, a parallel
layout or a cluster before real data is involved (like Megatron's mock-data pretraining).

The data are counting sequences (t, t+1, t+2, ... mod vocab) that a tiny model learns within a
few dozen steps, so a falling loss is a meaningful signal.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from avr_megatron.config import AvrConfig, save_config
from avr_megatron.runtime.device import to_device
from avr_megatron.runtime.files import atomic_write_text


@dataclass
class SmokeRun:
    summary: dict
    chunks: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any


def counting_batches(vocab: int, micro_batch_size: int, seq_length: int, seed: int):
    """Endless (tokens, labels) microbatches of counting sequences."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(seq_length + 1)
    while True:
        start = torch.randint(0, vocab, (micro_batch_size, 1), generator=g)
        seq = (start + steps) % vocab
        yield seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _lm_loss(labels, logits):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # [b, s, v/tp] -> Megatron's [s, b, v/tp] convention for the fused CE.
    losses = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous().float(),
                                          labels.transpose(0, 1).contiguous())
    total = losses.sum()
    count = torch.tensor(labels.numel(), dtype=torch.int, device=total.device)
    return total, count, {"loss": total.detach() / labels.numel()}


def _forward_step(data_iterator, model):
    """The batches are made on the host; the model runs on this process's device."""
    tokens, labels = (to_device(t) for t in next(data_iterator))
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, positions, None), partial(_lm_loss, labels)


def run_smoke(cfg: AvrConfig, progress: bool = True) -> SmokeRun:
    """Train cfg.train.train_iters steps; rank 0 also writes the summary to run.dir."""
    from megatron.core import parallel_state
    from tqdm import tqdm

    from avr_megatron.models.llama import build_model
    from avr_megatron.runtime.distributed import initialize, is_rank0
    from avr_megatron.training.setup import (
        build_optimizer,
        build_scheduler,
        num_microbatches,
        params_synced,
        wrap_ddp,
    )
    from avr_megatron.training.step import train_step

    layout = initialize(cfg)
    chunks = wrap_ddp(build_model(cfg), cfg)
    optimizer = build_optimizer(chunks, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    t = cfg.train
    n_mb = num_microbatches(cfg, layout)
    # Every chunk of a data-parallel replica sees the same sequences; replicas differ.
    seed = cfg.run.seed + 1000 * parallel_state.get_data_parallel_rank()
    data = counting_batches(cfg.model.vocab_size, t.micro_batch_size, t.seq_length, seed)
    history, start = [], time.time()
    bar = tqdm(range(t.train_iters), desc="smoke",
               disable=not (progress and is_rank0()) or None)  # None: on a terminal only
    for it in bar:
        batches = [next(data) for _ in range(n_mb)]
        result = train_step(_forward_step, batches, chunks, optimizer, scheduler,
                            seq_length=t.seq_length, micro_batch_size=t.micro_batch_size)
        # The history's lr is the scheduler's after the step, as this summary always showed.
        history.append({"iter": it + 1, "loss": result.metrics["loss"],
                        "lr": optimizer.param_groups[0]["lr"], "grad_norm": result.grad_norm})
        bar.set_postfix(loss=f"{result.metrics['loss']:.3f}")
    elapsed = time.time() - start
    with params_synced(chunks):  # the returned chunks hold the final weights
        pass
    summary = {
        "layout": vars(layout), "iters": t.train_iters, "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"], "seconds": round(elapsed, 2),
        "tokens_per_second": round(t.train_iters * t.global_batch_size * t.seq_length / elapsed, 1),
        "history": history,
    }
    if is_rank0():
        run_dir = Path(cfg.run.dir)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_text(run_dir / "smoke_summary.json", json.dumps(summary, indent=2))
    return SmokeRun(summary, chunks, optimizer, scheduler)
