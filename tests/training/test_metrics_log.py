"""Metric sinks: JSONL every step (truncated past the checkpoint on resume), TensorBoard, and
W&B through its API (a stand-in module here: wandb is optional); MFU arithmetic."""

import json
import sys
import types

import pytest

from avr_megatron.config import load_config
from avr_megatron.training.flops import forward_flops, peak_flops
from avr_megatron.training.metrics_log import MetricsLog


def test_jsonl_tensorboard_and_resume_truncation(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.log_interval=2"])
    log = MetricsLog(cfg, 0, enabled=True)
    for it in range(1, 6):
        log.log(it, {"loss": 1.0 / it, "grad_norm": None, "rewards/accuracies": 0.5})
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    resumed = MetricsLog(cfg, 3, enabled=True)  # resumed from a checkpoint at iteration 3
    resumed.log(4, {"loss": 0.3})
    resumed.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["loss"]) for r in rows][-2:] == [(3, 1 / 3), (4, 0.3)]
    assert MetricsLog(cfg, 0, enabled=False).tb is None


def test_wandb_stand_in(tmp_path, monkeypatch):
    calls = []

    class Run:
        summary = {}

        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, [f"run.dir={tmp_path}", "logging.wandb_project=avr",
                             "logging.tensorboard=false"])
    log = MetricsLog(cfg, 0, enabled=True)
    log.log(1, {"loss": 0.5, "note": "text", "nan": float("nan")})
    log.close({"iteration": 1})
    init = calls[0][1]
    assert init["project"] == "avr" and init["resume"] == "allow"
    assert len(init["id"]) == 8 and init["id"].isalnum() and init["id"].islower()
    assert init["config"]["loss"]["beta"] == 0.1
    assert calls[1] == ("log", 1, {"train/loss": 0.5})
    assert (tmp_path / "wandb_run_id").read_text() == init["id"]
    MetricsLog(cfg, 1, enabled=True).close()  # a resumed run continues the same W&B run
    assert calls[-2][1]["id"] == init["id"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    from avr_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="wandb package is not installed"):
        MetricsLog(cfg, 0, enabled=True)


def test_real_wandb_offline(tmp_path, monkeypatch):
    """The real package (the `wandb` extra), offline: init, log, summary, resume."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, [f"run.dir={tmp_path}", "logging.wandb_project=avr",
                             "logging.tensorboard=false"])
    log = MetricsLog(cfg, 0, enabled=True)
    log.log(1, {"loss": 0.5, "grad_norm": None})
    log.close({"iteration": 1, "loss": 0.5})
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    MetricsLog(cfg, 1, enabled=True).close()
    assert (tmp_path / "wandb_run_id").read_text() == run_id


def test_flops_and_peak():
    m = load_config(None, ["model.preset=tiny"]).model
    # tiny: h=64, 4 heads x 16, 2 groups, ffn 128, vocab 512, 2 layers
    per_token = 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 64 * 512
    attention = 2 * 2 * 2 * 64 * (10 ** 2 + 6 ** 2) / 2
    assert forward_flops(m, 16, 10 ** 2 + 6 ** 2) == 2 * per_token * 16 + attention
    assert peak_flops("NVIDIA H100 80GB HBM3", False, None) == 989.4e12
    assert peak_flops("NVIDIA H100 80GB HBM3", True, None) == 2 * 989.4e12
    assert peak_flops("cpu", False, None) is None and peak_flops(None, False, 100.0) == 1e14
