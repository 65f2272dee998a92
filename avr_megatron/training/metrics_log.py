"""Where training metrics go, on rank 0: `<run.dir>/metrics.jsonl` (every step; the record tests
and tools read), TensorBoard (every train.log_interval steps) and Weights & Biases when
`logging.wandb_project` is set; validation metrics (eval/...) whenever they are computed. A
resumed run first drops entries past its checkpoint, so the logs read as one uninterrupted run.

`ProgressLog` is what a person watching the run sees: a progress bar on a terminal, and
elsewhere (Slurm rank logs, pipeline task logs) one plain line every train.log_interval steps,
since a bar's carriage-return fragments are unreadable in a file."""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.runtime.files import atomic_write_text


def _finite(values: dict) -> dict:
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MetricsLog:
    def __init__(self, cfg: AvrConfig, start_iteration: int, enabled: bool):
        self.enabled = enabled
        self.interval = cfg.train.log_interval
        self.jsonl = Path(cfg.run.dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(start_iteration)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.run.dir) / "tensorboard"),
                                    purge_step=start_iteration + 1)
        if cfg.logging.wandb_project:
            self.wandb = _start_wandb(cfg)

    def _truncate(self, start_iteration: int) -> None:
        if not self.jsonl.is_file():
            return
        keep = [line for line in self.jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= start_iteration]
        atomic_write_text(self.jsonl, "".join(line + "\n" for line in keep))

    def log(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"iteration": iteration, **values}) + "\n")
        # Training metrics every train.log_interval steps as train/<name>; validation metrics
        # (already named eval/<name>) whenever there are some.
        scalars = {(k if k.startswith("eval/") else f"train/{k}"): v
                   for k, v in _finite(values).items()
                   if k.startswith("eval/") or iteration % self.interval == 0}
        if not scalars:
            return
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def close(self, summary: dict | None = None) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(_finite(summary))
            self.wandb.finish()


def _new_run_id() -> str:
    """A W&B run id: 8 random base-36 characters, W&B's own format (wandb 0.31 no longer
    exports wandb.util.generate_id)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _start_wandb(cfg: AvrConfig):
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb_project is set but the wandb package is not installed "
                          "(pip install 'avr-megatron[wandb]'), or unset "
                          "logging.wandb_project") from None
    from omegaconf import OmegaConf

    run_dir = Path(cfg.run.dir)
    id_file = run_dir / "wandb_run_id"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if id_file.is_file() else _new_run_id()
    atomic_write_text(id_file, run_id)
    return wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                      name=cfg.run.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=OmegaConf.to_container(OmegaConf.structured(cfg)))


class ProgressLog:
    """Rank 0's view of training progress: a tqdm bar when stderr is a terminal (and
    logging.progress_bar is on); otherwise one line every train.log_interval steps, e.g.

        avr train sft: step 20/100 loss 2.3456 | 5,100 tokens/s | 12.3 TFLOP/s/GPU | mem 3.2 GiB | ETA 0:01:40

    Model TFLOP/s per GPU counts model FLOPs only (training/flops.py); memory is the peak
    allocated on the GPU, or the process's peak resident memory on CPU."""

    def __init__(self, cfg: AvrConfig, name: str, total: int, start: int, enabled: bool,
                 metrics: tuple[str, ...] = ("loss",), stream=None):
        self.name, self.total, self.start, self.metrics = name, total, start, metrics
        self.enabled, self.interval = enabled, max(1, cfg.train.log_interval)
        self.stream = stream or sys.stderr
        self.t0 = time.time()
        self.bar = None
        if enabled and cfg.logging.progress_bar and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True,
                            file=self.stream)

    def update(self, iteration: int, row: dict) -> None:
        if not self.enabled:
            return
        shown = {k.split("/")[-1]: row[k] for k in self.metrics if _is_number(row.get(k))}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        elif iteration % self.interval == 0 or iteration == self.total:
            print(self.line(iteration, row, shown), file=self.stream, flush=True)

    def line(self, iteration: int, row: dict, shown: dict) -> str:
        parts = [f"{self.name}: step {iteration}/{self.total}"
                 + "".join(f" {k} {v:.4f}" for k, v in shown.items())]
        if _is_number(row.get("tokens_per_second")):
            parts.append(f"{row['tokens_per_second']:,.0f} tokens/s")
        if _is_number(row.get("tflops_per_gpu")):
            parts.append(f"{row['tflops_per_gpu']:.3g} TFLOP/s/GPU"
                         + (f" (MFU {row['mfu']:.1%})" if _is_number(row.get("mfu")) else ""))
        parts.append(f"mem {_peak_memory_gib():.1f} GiB")
        done = iteration - self.start
        if done > 0:
            eta = (time.time() - self.t0) / done * (self.total - iteration)
            parts.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    import torch

    from avr_megatron.runtime.device import on_gpu

    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
