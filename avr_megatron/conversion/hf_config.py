"""Our `cfg.model` -> Hugging Face LlamaConfig (config.json), and the converter's side of the
other direction: layout checks, the recipe stored with a converted checkpoint, dtypes. Reading
config.json into `cfg.model` (what is supported, both RoPE spellings) is config/hf_model.py's
job: torch-free, so the resolve step can use it.
"""

from __future__ import annotations

import copy

import torch

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.config.hf_model import ARCHITECTURE
from avr_megatron.config.schema import ModelConfig
from avr_megatron.conversion.errors import ConversionError

DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HF_DTYPE_NAME = {v: k for k, v in _HF_DTYPE.items()}


def check_layout(m: ModelConfig, tp: int, pp: int, where: str = "config.json") -> None:
    """The HF-side reasons a model cannot be split into `tp` x `pp`, naming HF fields."""
    errors = []
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp {tp} / --pp {pp}: both must be >= 1")
    for field, value in (("num_attention_heads", m.num_attention_heads),
                         ("num_key_value_heads", m.num_query_groups),
                         ("intermediate_size", m.ffn_hidden_size)):
        if value % tp:
            errors.append(f"{field}={value} is not divisible by --tp {tp}")
    if m.make_vocab_size_divisible_by % tp:
        errors.append(f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} is "
                      f"not divisible by --tp {tp}")
    if m.num_layers % pp:
        errors.append(f"num_hidden_layers={m.num_layers} is not divisible by --pp {pp}")
    if errors:
        raise ConversionError(f"{where}: " + "; ".join(errors))


def avr_config_for(m: ModelConfig, base: AvrConfig, tp: int, pp: int, dtype: torch.dtype,
                   where: str = "config.json") -> AvrConfig:
    """The recipe stored with a converted checkpoint: `base` with this model, layout and
    precision, validated by the same rules as any recipe (train.seq_length is capped at the
    model's max_position_embeddings so the schema default never makes a small model invalid)."""
    from avr_megatron.config.validate import validate_config

    cfg = copy.deepcopy(base)
    cfg.model = m
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.pipeline_model_parallel_size = pp
    if cfg.parallel.virtual_pipeline_model_parallel_size and pp < 2:
        cfg.parallel.virtual_pipeline_model_parallel_size = None
    cfg.precision.bf16 = dtype == torch.bfloat16
    cfg.train.seq_length = min(cfg.train.seq_length, m.max_position_embeddings)
    try:
        validate_config(cfg)
    except ConfigError as e:
        raise ConversionError(f"{where}: the converted model config is invalid: {e}") from None
    return cfg


def hf_dtype(hf: dict) -> torch.dtype | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    return _HF_DTYPE.get(name) if isinstance(name, str) else None


def hf_config_from_model(m: ModelConfig, dtype: torch.dtype, base: dict | None = None,
                         token_ids: dict | None = None) -> dict:
    """config.json for `m`. With `base` (the config the model was converted from), every field
    it holds is kept and only the architecture fields are rewritten, in its RoPE spelling.
    Without, the classic `rope_theta` + `rope_scaling` spelling is written, which both
    transformers 4.x and 5.x read."""
    out = copy.deepcopy(base) if base else {}
    out.pop("_name_or_path", None)
    out.update({
        "architectures": [ARCHITECTURE], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads,
        "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.norm_epsilon,
        "tie_word_embeddings": m.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_method_std,
    })
    out.setdefault("use_cache", True)
    rs = m.rope_scaling
    scaling = None if rs.type is None else {
        "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
        "high_freq_factor": rs.high_freq_factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings}
    if "rope_parameters" in out:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rotary_base} \
            if scaling is None else dict(scaling, rope_theta=m.rotary_base)
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
    else:
        out["rope_theta"] = m.rotary_base
        out["rope_scaling"] = scaling
    out["dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"] = \
        _HF_DTYPE_NAME[dtype]
    for key, value in (token_ids or {}).items():
        out.setdefault(key, value)
    return dict(sorted(out.items()))


def generation_config(hf_config: dict) -> dict:
    """A minimal generation_config.json when the source carried none."""
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_config.get(key) is not None:
            gen[key] = hf_config[key]
    return gen
