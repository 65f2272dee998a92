"""recipe -> validated -> resolved and frozen run config (no torch import).

In the spirit of Megatron-Bridge's single runtime update before setup: values that depend on
something outside the recipe are settled here, once, into a new config that is validated again
and then frozen (an assignment raises FrozenInstanceError). Every consumer reads the resolved
value; nothing changes the config afterwards.

- `resolve_config`, before setup: the model's shape from the HF config.json of
  `model.init_from.hf` (read as JSON).
- `resolve_iterations`, where the dataset size becomes known (the training loop, after the data
  is loaded and packed into bins): `train.train_iters = data.num_epochs x steps per epoch`.
  It returns a new frozen config; the one the loop got is left as it was.

The parallel layout (DP, micro-batches per step) needs the world size and is derived by
config/layout.py's rule, not stored in the config.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from avr_megatron.config.errors import ConfigError, ConversionError
from avr_megatron.config.schema import AvrConfig, freeze, is_frozen

log = logging.getLogger(__name__)

# Model keys that decide the weights' shapes: a checkpoint must match the recipe on them, and
# with model.init_from.hf they (and max_position_embeddings) come from its config.json.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
              "rotary_base", "rope_scaling", "norm_epsilon", "tie_word_embeddings")
HF_MODEL_KEYS = (*SHAPE_KEYS, "max_position_embeddings")


def _validated_frozen(cfg: AvrConfig) -> AvrConfig:
    from avr_megatron.config.validate import validate_config

    validate_config(cfg)
    return freeze(cfg)


def _model_from_hf(cfg: AvrConfig) -> None:
    """Set cfg.model's shape keys (cfg is resolve_config's private copy) from the HF
    config.json of model.init_from.hf, as the converter reads it."""
    from avr_megatron.config.hf_model import model_config_from_hf, read_hf_config

    src = cfg.model.init_from.hf
    where = str(Path(src) / "config.json")
    try:
        m = model_config_from_hf(read_hf_config(Path(src)), cfg.model, where)
    except ConversionError as e:
        raise ConfigError(f"model.init_from.hf: {e}") from None
    changed = [k for k in HF_MODEL_KEYS if getattr(m, k) != getattr(cfg.model, k)]
    for k in HF_MODEL_KEYS:
        setattr(cfg.model, k, getattr(m, k))
    if changed:
        log.info("model shape from %s: %s", where,
                 ", ".join(f"model.{k}={getattr(m, k)!r}" for k in changed))


def resolve_config(cfg: AvrConfig) -> AvrConfig:
    """The resolved, validated and frozen run config for `cfg` (a validated recipe, which is
    left unchanged)."""
    out = copy.deepcopy(cfg)
    if out.model.init_from.hf:
        _model_from_hf(out)
    return _validated_frozen(out)


def train_iterations(cfg: AvrConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: data.num_epochs passes of `steps_per_epoch`, or
    train.train_iters when no epoch count is given."""
    return (cfg.data.num_epochs * steps_per_epoch if cfg.data.num_epochs
            else cfg.train.train_iters)


def resolve_iterations(cfg: AvrConfig, steps_per_epoch: int) -> AvrConfig:
    """`cfg` with train.train_iters settled from data.num_epochs now that the dataset's steps
    per epoch are known (a new frozen config; `cfg` itself when nothing changes and it is
    already frozen). The LR schedule and the saved config.yaml then span the real run length."""
    iters = train_iterations(cfg, steps_per_epoch)
    if iters == cfg.train.train_iters and is_frozen(cfg):
        return cfg
    out = copy.deepcopy(cfg)
    if iters != out.train.train_iters:
        log.info("train.train_iters=%d from data.num_epochs=%d x %d steps per epoch", iters,
                 cfg.data.num_epochs, steps_per_epoch)
        out.train.train_iters = iters
    return _validated_frozen(out)
