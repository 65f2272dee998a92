"""recipe -> validated -> resolved and frozen run config (no torch import).

In the spirit of Megatron-Bridge's single runtime update before setup: values that depend on
something outside the recipe are settled here, once, into a new config that is validated again
and then frozen (an assignment raises FrozenInstanceError). Every consumer reads the resolved
value; nothing changes the config afterwards.

- `resolve_config`, before setup: the model's shape from the HF config.json of
  `model.init_from.hf` (read as JSON).
- `resolve_stage_config`, for each `avr pipeline` stage: the recipe + the stage's
  `pipeline.stages.<name>` overrides + the pipeline's wiring of that stage (which model it starts
  from, where it reads and writes: avr_megatron.pipeline.stage_configs derives it from the stage
  graph); an override that contradicts the wiring is refused, naming both.
- `resolve_iterations`, where the dataset size becomes known (the training loop, after the data
  is loaded and packed into bins): `train.train_iters = data.num_epochs x steps per epoch`.
  It returns a new frozen config; the one the loop got is left as it was.

The parallel layout (DP, micro-batches per step) needs the world size and is derived by
config/layout.py's rule, not stored in the config.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf key paths of a nested mapping -> their values (a non-empty mapping is not a leaf)."""
    if isinstance(tree, Mapping) and (tree or not prefix):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _check_wiring_conflicts(stage: str, wiring: Mapping[str, Any],
                            layers: list[tuple[Any, str]]) -> None:
    """A user override of a key the pipeline wires (where a stage reads, writes and starts from)
    would be replaced by the wiring: refuse it, naming both values. An override equal to the
    wired value is accepted. `layers`: (user overrides, where they come from)."""
    wired = _leaves(wiring)
    conflicts = []
    for layer, source in layers:
        for upath, uvalue in _leaves(layer or {}).items():
            if isinstance(uvalue, Mapping):  # an empty mapping overrides nothing
                continue
            for wpath, wvalue in wired.items():
                n = min(len(upath), len(wpath))
                if upath[:n] != wpath[:n] or (upath == wpath and uvalue == wvalue):
                    continue
                conflicts.append(f"{source} sets {'.'.join(upath)}={uvalue!r}, but the pipeline "
                                 f"wires {'.'.join(wpath)}={wvalue!r} for stage {stage}")
    if conflicts:
        raise ConfigError("; ".join(conflicts) + ". The pipeline connects its stages through "
                          "these keys: remove the override (run.dir and pipeline.base_model "
                          "move them).")


def resolve_stage_config(recipe: AvrConfig, stage: str, wiring: Mapping[str, Any], *,
                         shares_overrides_of: tuple[str, ...] = ()) -> AvrConfig:
    """The validated, frozen config of pipeline stage `stage`: `recipe`, then the
    `pipeline.stages.<name>` overrides of `shares_overrides_of` and of `stage` itself, then
    `wiring` (nested recipe keys the pipeline sets). `recipe` is left unchanged."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from avr_megatron.config.loader import merge_checked
    from avr_megatron.config.validate import validate_config

    merged = OmegaConf.structured(recipe)
    layers = [(recipe.pipeline.stages.get(name) or {}, f"pipeline.stages.{name}")
              for name in (*shares_overrides_of, stage)]
    _check_wiring_conflicts(stage, wiring, layers)
    layers += [(wiring, f"pipeline wiring of {stage}")]
    for layer, source in layers:
        merged = merge_checked(merged, OmegaConf.create(layer), source)
    try:
        cfg: AvrConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"pipeline.stages.{stage}: {e}") from None
    try:
        validate_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"stage {stage} (recipe + pipeline.stages.{stage}): {e}") from None
    return freeze(cfg)
