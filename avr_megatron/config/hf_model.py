"""Hugging Face LlamaConfig (config.json, read as JSON) -> our `cfg.model` (ModelConfig), with
no torch import: the resolve step (config/resolve.py) takes a run's model shape from it, and
the converter (conversion/hf_config.py) builds on it.

Only what the Megatron Llama builder reproduces exactly is accepted: dense Llama decoders with
SiLU-gated MLPs, RMSNorm, no biases, default or Llama-3 RoPE. Anything else (MoE, other
architectures, attention or MLP biases, other RoPE types, quantized weights) is rejected with a
ConversionError naming the config field, before any weight is read. Both RoPE spellings are
read: the transformers>=5 `rope_parameters` dict and the older `rope_theta` + `rope_scaling` pair
that most hub checkpoints still carry.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

from avr_megatron.config.errors import ConversionError
from avr_megatron.config.schema import ModelConfig, RopeScalingConfig

ARCHITECTURE = "LlamaForCausalLM"
DEFAULT_ROPE_THETA = 10000.0  # transformers' Llama default when config.json names none
_MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
               "moe_intermediate_size", "n_shared_experts", "moe_layer_freq")


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
