"""Where initial weights come from (`model.init_from`, `logps.reference`) and where final
weights go (`checkpoint.export_hf`).

Megatron dist checkpoints load directly (any TP/PP layout). Hugging Face checkpoints go through
the conversion package (avr_megatron.conversion); until it is part of this build, asking for
them fails at startup, before any work, with a message saying so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.config.schema import InitFromConfig

log = logging.getLogger(__name__)

# Model keys that must match between a checkpoint and the recipe for its weights to fit.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
              "rotary_base", "rope_scaling", "norm_epsilon", "tie_word_embeddings")


def _conversion(name: str, key: str):
    """A function of the HF conversion package, or a ConfigError naming the recipe key."""
    try:
        import avr_megatron.conversion as conversion  # noqa: F401  (the conversion issue)
    except ImportError:
        conversion = None
    fn = getattr(conversion, name, None) if conversion is not None else None
    if fn is None:
        raise ConfigError(
            f"{key} needs the Hugging Face <-> Megatron converter (avr_megatron.conversion."
            f"{name}), which this build does not include yet; use a Megatron checkpoint "
            "(model.init_from.mcore / logps.reference.mcore) or convert the checkpoint first")
    return fn


def check_sources(cfg: AvrConfig) -> None:
    """Fail fast (before data or models are built) on sources this build cannot read/write."""
    for key, src in (("model.init_from.hf", cfg.model.init_from),
                     ("logps.reference.hf", cfg.logps.reference)):
        if src.hf is not None:
            if not Path(src.hf).is_dir():
                raise ConfigError(f"{key}={src.hf}: no such directory")
            _conversion("load_hf_weights", key)
    for key, src in (("model.init_from.mcore", cfg.model.init_from),
                     ("logps.reference.mcore", cfg.logps.reference)):
        if src.mcore is not None:
            from avr_megatron.checkpoint.dist_ckpt import CheckpointError, resolve

            try:
                resolve(src.mcore)
            except CheckpointError as e:
                raise ConfigError(f"{key}: {e}") from None
    if cfg.checkpoint.export_hf is not None:
        _conversion("export_hf_weights", "checkpoint.export_hf")


def check_checkpoint_shape(ckpt: Path, cfg: AvrConfig, key: str) -> None:
    """The checkpoint's saved model config must describe the same shapes as the recipe."""
    saved = ckpt / "config.yaml"
    if not saved.is_file():
        return
    from omegaconf import OmegaConf

    theirs = OmegaConf.to_container(OmegaConf.load(saved)).get("model", {})
    mine = asdict(cfg.model)
    diffs = [f"model.{k}: checkpoint {theirs.get(k)!r}, recipe {mine[k]!r}" for k in SHAPE_KEYS
             if k in theirs and theirs[k] != mine[k]]
    if diffs:
        raise ConfigError(f"{key}={ckpt}: the checkpoint's model does not match the recipe:\n  "
                          + "\n  ".join(diffs))


def load_initial_weights(chunks, cfg: AvrConfig, src: InitFromConfig, key: str) -> str:
    """Load `src` into the model chunks; returns a description for logs and summaries."""
    if src.mcore:
        from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, resolve

        ckpt = resolve(src.mcore)
        check_checkpoint_shape(ckpt, cfg, f"{key}.mcore")
        load_checkpoint(ckpt, chunks)
        return f"mcore:{ckpt}"
    if src.hf:
        _conversion("load_hf_weights", f"{key}.hf")(chunks, cfg, src.hf)
        return f"hf:{src.hf}"
    return f"random(seed={cfg.run.seed})"


def export_final(chunks, cfg: AvrConfig) -> str | None:
    if cfg.checkpoint.export_hf is None:
        return None
    _conversion("export_hf_weights", "checkpoint.export_hf")(chunks, cfg,
                                                             cfg.checkpoint.export_hf)
    return cfg.checkpoint.export_hf
