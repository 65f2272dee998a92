"""Where training metrics go, on rank 0: `<run.dir>/metrics.jsonl` (every step; the record tests
and tools read), TensorBoard (every train.log_interval steps) and Weights & Biases when
`logging.wandb_project` is set; validation metrics (eval/...) whenever they are computed. A
resumed run first drops entries past its checkpoint, so the logs read as one uninterrupted
run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from avr_megatron.config import AvrConfig, ConfigError


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
        tmp = self.jsonl.with_name(f".{self.jsonl.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.jsonl)

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
    id_file.write_text(run_id)
    return wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                      name=cfg.run.name, id=run_id, resume="allow", dir=str(run_dir),
                      config=OmegaConf.to_container(OmegaConf.structured(cfg)))
