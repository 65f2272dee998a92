"""Each step's metrics row and the summary statistics, in plain Python."""

import math

import pytest

from avr_megatron.config import load_config
from avr_megatron.training.flops import forward_flops
from avr_megatron.training.report import History, StepMetrics, StepTokens


def _row(reporter, seconds=2.0, **metrics):
    return reporter.row(metrics or {"loss": 1.5}, lr=1e-3, grad_norm=0.5, seconds=seconds,
                        tokens=StepTokens(real=300, targets=120, sum_sq_lengths=9000),
                        skipped_steps=1, epoch=0)


def test_row_throughput_padding_and_flops():
    model = load_config(None, []).model
    reporter = StepMetrics(model, global_batch_size=4, seq_length=100, world_size=2,
                           reference_factor=1 / 3)
    row = _row(reporter)
    assert list(row) == ["loss", "lr", "grad_norm", "seconds", "tokens_per_second",
                         "padding_fraction", "target_tokens", "skipped_steps", "epoch",
                         "tflops_per_gpu"]  # metrics.jsonl's column order
    assert row["tokens_per_second"] == 150 and row["padding_fraction"] == pytest.approx(0.25)
    flops = forward_flops(model, 300, 9000) * 4  # forward + backward + reference forward
    assert row["tflops_per_gpu"] == pytest.approx(flops / 2.0 / 2 / 1e12)
    gpu = StepMetrics(model, 4, 100, 2, 0.0, mfu_denominator=1e12)
    assert gpu.row({"loss": 1.0}, lr=0, grad_norm=None, seconds=1.0,
                   tokens=StepTokens(300, 120, 9000), skipped_steps=0,
                   epoch=0)["mfu"] == pytest.approx(forward_flops(model, 300, 9000) * 3 / 1e12)


def test_history_summary_first_last_and_mean_of_last_ten():
    h = History()
    assert h.summary() == {"tokens_per_second": None, "first": {}, "last": {},
                           "last10_mean": {}}
    for i in range(12):
        h.add({"iteration": i + 1, "loss": float(i), "seconds": 1.0, "tokens_per_second": 10.0,
               "lr": 0.1, "grad_norm": None, "epoch": 0, "eval/loss": math.nan})
    s = h.summary()
    assert s["tokens_per_second"] == 10.0
    assert s["first"]["loss"] == 0.0 and s["last"]["loss"] == 11.0
    assert s["last10_mean"]["loss"] == pytest.approx(6.5)  # mean of 2..11
    assert not {"iteration", "seconds", "lr", "grad_norm", "epoch"} & set(s["last"])
    assert "eval/loss" in s["last"]
