"""`pipeline.make_tiny_models`: random tiny policy and reward models for the CPU test recipes,
made once next to `pipeline.base_model` (the tiny recipe's `${run.dir}/models`).

`avr pipeline` hands `ensure_tiny_models` to the pipeline runner as its model hook, so the
pipeline package never imports test helpers. The hook runs in the pipeline's own (launch)
environment, which has no torch: the models are made by the train environment's Python
(`python -m avr_megatron.testing.tiny_models BASE_DIR REWARD_DIR`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def ensure_tiny_models(cfg) -> None:
    """Make the tiny models of `cfg` (an AvrConfig) unless pipeline.base_model exists."""
    from avr_megatron.config.errors import ConfigError
    from avr_megatron.launch.roles import role_python

    base = Path(cfg.pipeline.base_model)
    if base.exists():
        return
    reward = cfg.synth.reward.model or ""
    proc = subprocess.run([*role_python(cfg, "train"), "-m", __name__, str(base), reward],
                          capture_output=True, text=True)
    if proc.returncode:
        raise ConfigError(f"pipeline.make_tiny_models: making tiny models in {base.parent} "
                          f"failed:\n{proc.stderr[-2000:]}")
    print(proc.stdout.strip())


def make_tiny_models(base_dir: str, reward_dir: str) -> None:
    """The work of ensure_tiny_models, in the train environment: the policy at `base_dir`, and
    the reward model at `reward_dir` when it sits beside it and does not exist yet."""
    from avr_megatron.runtime.files import publish_dir
    from avr_megatron.testing.tiny_hf import make_tiny_llama, make_tiny_reward_model, train_tiny_tokenizer

    base = Path(base_dir)
    models = base.parent
    tmp = models / ".tmp-tiny-models"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = train_tiny_tokenizer(tmp / "tokenizer")
    made = {base.name: make_tiny_llama(tmp / base.name, tok)}
    reward = Path(reward_dir) if reward_dir else None
    if reward is not None and reward.parent == models and not reward.exists():
        made[reward.name] = make_tiny_reward_model(tmp / reward.name, tok)
    for name in made:
        publish_dir(tmp / name, models / name)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"avr pipeline: made random tiny models {sorted(made)} in {models}")


if __name__ == "__main__":
    make_tiny_models(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
