"""Hugging Face LlamaConfig (config.json, read as JSON) <-> our `cfg.model` (ModelConfig).

Only what the Megatron Llama builder reproduces exactly is accepted: dense Llama decoders with
SiLU-gated MLPs, RMSNorm, no biases, default or Llama-3 RoPE. Anything else (MoE, other
architectures, attention or MLP biases, other RoPE types, quantized weights) is rejected with an
error naming the config field, before any weight is read. Both RoPE spellings are read: the
transformers>=5 `rope_parameters` dict and the older `rope_theta` + `rope_scaling` pair that most
hub checkpoints still carry.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import torch

from avr_megatron.config import AvrConfig, ConfigError
from avr_megatron.config.schema import ModelConfig, RopeScalingConfig
from avr_megatron.conversion.errors import ConversionError

ARCHITECTURE = "LlamaForCausalLM"
DEFAULT_ROPE_THETA = 10000.0  # transformers' Llama default when config.json names none
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
               "moe_intermediate_size", "n_shared_experts", "moe_layer_freq")
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HF_DTYPE_NAME = {v: k for k, v in _HF_DTYPE.items()}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: not found (is {hf_dir} a Hugging Face model directory?)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return cfg


def _rope(hf: dict, where: str) -> tuple[float, RopeScalingConfig]:
    """(rope theta, our scaling config) from either RoPE spelling."""
    field = "rope_parameters" if hf.get("rope_parameters") is not None else "rope_scaling"
    params = hf.get(field) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"{where}: {field} must be an object, got {params!r}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{where}: partial_rotary_factor={partial} is not supported "
                              "(Llama rotates the whole head)")
    if rope_type in (None, "default"):
        return theta, RopeScalingConfig(type=None)
    if rope_type != "llama3":
        raise ConversionError(f"{where}: {field}.rope_type={rope_type!r} is not supported "
                              "(supported: default, llama3)")
    try:
        return theta, RopeScalingConfig(
            type="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params.get(
                "original_max_position_embeddings", hf["max_position_embeddings"])))
    except KeyError as e:
        raise ConversionError(f"{where}: {field} of type llama3 lacks {e.args[0]!r}") from None


def model_config_from_hf(hf: dict, base: ModelConfig | None = None,
                         where: str = "config.json") -> ModelConfig:
    """Our model section for an HF Llama config. Keys HF does not describe (vocab padding
    multiple, init std, layer implementation, recompute) keep `base`'s values."""
    moe = [f"{k}={hf[k]}" for k in _MOE_FIELDS if hf.get(k)]
    if moe:
        raise ConversionError(f"{where}: mixture-of-experts models are not supported "
                              f"({', '.join(moe)})")
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ConversionError(f"{where}: model_type={model_type!r} is not supported (only 'llama')")
    archs = hf.get("architectures") or [ARCHITECTURE]
    if list(archs) != [ARCHITECTURE]:
        raise ConversionError(f"{where}: architectures={archs} is not supported "
                              f"(only [{ARCHITECTURE!r}])")
    if hf.get("quantization_config"):
        raise ConversionError(f"{where}: quantization_config is set: quantized checkpoints are "
                              "not supported (convert the full-precision weights)")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise ConversionError(f"{where}: {key}={hf[key]!r} is not supported (Llama uses "
                                  f"{want!r})")
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        m = replace(
            copy.deepcopy(base) if base is not None else ModelConfig(),
            preset=None,
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=int(hf.get("head_dim") or hidden // heads),
            vocab_size=int(hf["vocab_size"]),
            max_position_embeddings=int(hf["max_position_embeddings"]),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_dropout=float(hf.get("attention_dropout", 0.0) or 0.0),
            init_method_std=float(hf.get("initializer_range", base.init_method_std if base
                                         else ModelConfig.init_method_std)),
        )
    except KeyError as e:
        raise ConversionError(f"{where}: required field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: bad value ({e})") from None
    theta, scaling = _rope(hf, where)
    return replace(m, rotary_base=theta, rope_scaling=scaling)


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
