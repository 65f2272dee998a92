"""What the training loop reports, in plain Python (no torch, no Megatron): each step's metrics
row (the objective's metrics, learning rate, gradient norm, throughput, padding, model FLOPs)
and the run summary's statistics over those rows. Where the rows go (metrics.jsonl,
TensorBoard, W&B, the progress line) is training/metrics_log.py."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from avr_megatron.config.schema import ModelConfig
from avr_megatron.training.flops import forward_flops


@dataclass
class StepTokens:
    """Token counts of one step's global batch."""

    real: int  # non-pad tokens
    targets: int  # trained tokens
    sum_sq_lengths: int  # sum of squared sequence lengths (attention FLOPs)


@dataclass
class StepMetrics:
    """Builds one step's metrics row."""

    model: ModelConfig
    global_batch_size: int  # bins per step
    seq_length: int  # tokens per bin
    world_size: int
    # Extra model forwards per training forward (an online reference: 1/3 of a step's 3).
    reference_factor: float = 0.0
    # Peak FLOP/s of all devices together (None: no MFU, e.g. on CPU).
    mfu_denominator: float | None = None

    def row(self, metrics: dict, *, lr: float, grad_norm: float | None, seconds: float,
            tokens: StepTokens, skipped_steps: int, epoch: int) -> dict:
        row = {**metrics, "lr": lr, "grad_norm": grad_norm, "seconds": seconds,
               "tokens_per_second": tokens.real / seconds,
               "padding_fraction": 1 - tokens.real / (self.global_batch_size * self.seq_length),
               "target_tokens": tokens.targets, "skipped_steps": skipped_steps, "epoch": epoch}
        flops = (forward_flops(self.model, tokens.real, tokens.sum_sq_lengths)
                 * (3 + 3 * self.reference_factor))
        row["tflops_per_gpu"] = flops / seconds / self.world_size / 1e12
        if self.mfu_denominator:
            row["mfu"] = flops / seconds / self.mfu_denominator
        return row


# Row keys the summary does not repeat (per-step facts, not results).
NOT_SUMMARISED = ("iteration", "seconds", "lr", "grad_norm", "epoch")


class History:
    """What the summary needs of the per-step rows, in bounded memory (the full record is
    metrics.jsonl): the first row, the last ten, and token/time totals."""

    def __init__(self):
        self.first: dict = {}
        self.tail: deque = deque(maxlen=10)
        self.tokens = self.seconds = 0.0

    def add(self, row: dict) -> None:
        if not self.first:
            self.first = row
        self.tail.append(row)
        self.tokens += row["tokens_per_second"] * row["seconds"]
        self.seconds += row["seconds"]

    def summary(self) -> dict:
        """tokens_per_second over the run, and the first, last and mean of the last ten rows
        of each result (numbers only for the mean)."""
        last = self.tail[-1] if self.tail else {}
        keys = [k for k in last if k not in NOT_SUMMARISED]
        return {
            "tokens_per_second": self.tokens / self.seconds if self.seconds else None,
            "first": {k: self.first[k] for k in keys if k in self.first},
            "last": {k: last[k] for k in keys},
            "last10_mean": {k: float(np.mean([h[k] for h in self.tail])) for k in keys
                            if all(isinstance(h.get(k), (int, float)) for h in self.tail)},
        }

