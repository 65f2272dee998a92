"""Where initial weights come from (`model.init_from`, `logps.reference`) and where final
weights go (`checkpoint.export_hf`).

Megatron dist checkpoints load directly (any TP/PP layout). A Hugging Face directory is
converted once by the conversion package (`convert_hf_to_mcore`, streaming, on rank 0) into
`<run.dir>/hf_init/<name>-<fingerprint>/` and loaded from there; a rerun or the reference model
reuses it. The final weights export with `convert_mcore_to_hf`. Without the conversion package
in the build, asking for either fails at startup, before any work, with a message saying so.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.config.resolve import SHAPE_KEYS
from avr_megatron.config.schema import InitFromConfig


def _conversion(name: str, key: str):
    """A function of the HF conversion package, or a ConfigError naming the recipe key."""
    try:
        import avr_megatron.conversion as conversion
    except ImportError:
        conversion = None
    fn = getattr(conversion, name, None) if conversion is not None else None
    if fn is None:
        raise ConfigError(
            f"{key} needs the Hugging Face <-> Megatron converter (avr_megatron.conversion."
            f"{name}), which this build does not include; use a Megatron checkpoint "
            "(model.init_from.mcore / logps.reference.mcore) or convert the checkpoint first")
    return fn


def _on_rank0(fn, key: str):
    """Run fn on rank 0 only; every rank then raises rank 0's error, if any, as a ConfigError
    naming `key` (no rank is left waiting in a collective)."""
    import torch.distributed as dist

    from avr_megatron.runtime.distributed import is_rank0

    error = None
    if is_rank0():
        try:
            fn()
        except Exception as e:  # conversion errors name the file and tensor
            error = f"{key}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)


def hf_init_checkpoint(cfg: AvrConfig, hf_dir: str, key: str) -> Path:
    """The Megatron checkpoint converted from `hf_dir` (converted now unless already there)."""
    from avr_megatron.data.fingerprint import fingerprint_dir

    convert = _conversion("convert_hf_to_mcore", key)
    out = Path(cfg.run.dir) / "hf_init" / f"{Path(hf_dir).name}-{fingerprint_dir(hf_dir)}"

    def convert_once():  # rank 0 decides, so all ranks take the same path
        if not (out / "latest").is_file():
            convert(hf_dir, out, base=cfg)

    _on_rank0(convert_once, key)
    return out


def check_sources(cfg: AvrConfig) -> None:
    """Fail fast (before data or models are built) on sources this build cannot read/write."""
    for key, src in (("model.init_from.hf", cfg.model.init_from),
                     ("logps.reference.hf", cfg.logps.reference)):
        if src.hf is not None:
            if not Path(src.hf).is_dir():
                raise ConfigError(f"{key}={src.hf}: no such directory")
            _conversion("convert_hf_to_mcore", key)
    for key, src in (("model.init_from.mcore", cfg.model.init_from),
                     ("logps.reference.mcore", cfg.logps.reference)):
        if src.mcore is not None:
            from avr_megatron.checkpoint.dist_ckpt import CheckpointError, resolve

            try:
                resolve(src.mcore)
            except CheckpointError as e:
                raise ConfigError(f"{key}: {e}") from None
    if cfg.checkpoint.export_hf is not None:
        _conversion("convert_mcore_to_hf", "checkpoint.export_hf")
        if Path(cfg.checkpoint.export_hf).exists():
            raise ConfigError(f"checkpoint.export_hf={cfg.checkpoint.export_hf} already exists; "
                              "remove it or choose another directory")


def _shape(model: dict) -> dict:
    """The shape-deciding model keys, with the head dimension made explicit (kv_channels None
    means hidden_size / num_attention_heads)."""
    shape = {k: model.get(k) for k in SHAPE_KEYS}
    if shape["kv_channels"] is None and model.get("hidden_size") and \
            model.get("num_attention_heads"):
        shape["kv_channels"] = model["hidden_size"] // model["num_attention_heads"]
    return shape


def check_checkpoint_shape(ckpt: Path, cfg: AvrConfig, key: str) -> None:
    """The checkpoint's saved model config must describe the same shapes as the recipe."""
    saved = ckpt / "config.yaml"
    if not saved.is_file():
        return
    from omegaconf import OmegaConf

    theirs = _shape(OmegaConf.to_container(OmegaConf.load(saved)).get("model", {}))
    mine = _shape(asdict(cfg.model))
    diffs = [f"model.{k}: checkpoint {theirs[k]!r}, recipe {mine[k]!r}" for k in SHAPE_KEYS
             if theirs[k] is not None and theirs[k] != mine[k]]
    if diffs:
        raise ConfigError(f"{key}={ckpt}: the checkpoint's model does not match the recipe:\n  "
                          + "\n  ".join(diffs))


def load_initial_weights(chunks, cfg: AvrConfig, src: InitFromConfig, key: str) -> str:
    """Load `src` into the model chunks; returns a description for logs and summaries."""
    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, resolve

    if src.mcore:
        ckpt = resolve(src.mcore)
        check_checkpoint_shape(ckpt, cfg, f"{key}.mcore")
        load_checkpoint(ckpt, chunks, fully_parallel=cfg.checkpoint.fully_parallel_load)
        return f"mcore:{ckpt}"
    if src.hf:
        ckpt = resolve(hf_init_checkpoint(cfg, src.hf, f"{key}.hf"))
        check_checkpoint_shape(ckpt, cfg, f"{key}.hf")
        load_checkpoint(ckpt, chunks, fully_parallel=cfg.checkpoint.fully_parallel_load)
        return f"hf:{src.hf}"
    return f"random(seed={cfg.run.seed})"


def export_final(ckpt: Path, cfg: AvrConfig) -> str | None:
    """Export the final checkpoint to checkpoint.export_hf (rank 0; all ranks wait)."""
    if cfg.checkpoint.export_hf is None:
        return None
    from avr_megatron.data.dataset import tokenizer_path

    convert = _conversion("convert_mcore_to_hf", "checkpoint.export_hf")
    _on_rank0(lambda: convert(ckpt, cfg.checkpoint.export_hf, tokenizer=tokenizer_path(cfg)),
              "checkpoint.export_hf")
    return cfg.checkpoint.export_hf
