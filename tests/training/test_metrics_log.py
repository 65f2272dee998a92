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


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_plain_lines_off_a_terminal(tmp_path):
    """Off a TTY (Slurm rank logs): no bar fragments, one line every train.log_interval steps
    and at the last step, with loss, tokens/s, model TFLOP/s per GPU, memory and ETA."""
    from avr_megatron.training.metrics_log import ProgressLog

    cfg = load_config(None, [f"run.dir={tmp_path}", "train.log_interval=2"])
    out = _Stream(tty=False)
    p = ProgressLog(cfg, "avr train sft", total=5, start=0, enabled=True,
                    metrics=("loss", "rewards/accuracies"), stream=out)
    for it in range(1, 6):
        p.update(it, {"loss": 1.0 / it, "tokens_per_second": 1234.5, "tflops_per_gpu": 0.25,
                      "rewards/accuracies": 0.5, "grad_norm": None})
    p.close()
    lines = out.text.splitlines()
    assert "\r" not in out.text and len(lines) == 3
    assert [ln.split(" | ")[0] for ln in lines] == [
        "avr train sft: step 2/5 loss 0.5000 accuracies 0.5000",
        "avr train sft: step 4/5 loss 0.2500 accuracies 0.5000",
        "avr train sft: step 5/5 loss 0.2000 accuracies 0.5000"]
    fields = lines[0].split(" | ")
    assert fields[1:3] == ["1,234 tokens/s", "0.25 TFLOP/s/GPU"]
    assert fields[3].startswith("mem ") and fields[3].endswith(" GiB")
    assert fields[4].startswith("ETA 0:00:0")
    quiet = _Stream(tty=False)  # not rank 0
    ProgressLog(cfg, "x", 5, 0, enabled=False, stream=quiet).update(2, {"loss": 1.0})
    assert quiet.text == ""


def test_progress_bar_on_a_terminal(tmp_path):
    from avr_megatron.training.metrics_log import ProgressLog

    cfg = load_config(None, [f"run.dir={tmp_path}", "train.log_interval=1"])
    out = _Stream(tty=True)
    p = ProgressLog(cfg, "avr train dpo", total=3, start=1, enabled=True, stream=out)
    assert p.bar is not None
    p.update(2, {"loss": 0.7})
    p.close()
    assert "avr train dpo" in out.text and "loss=0.7" in out.text and " | ETA" not in out.text
    off = ProgressLog(load_config(None, [f"run.dir={tmp_path}", "logging.progress_bar=false"]),
                      "x", 3, 0, enabled=True, stream=_Stream(tty=True))
    assert off.bar is None  # progress_bar=false: plain lines even on a terminal
