"""config.json -> cfg.model and back; unsupported models and layouts rejected by field."""

import copy
import json

import pytest
import torch

from avr_megatron.conversion.errors import ConversionError
from avr_megatron.config.hf_model import model_config_from_hf
from avr_megatron.conversion.hf_config import check_layout, hf_config_from_model

LLAMA_3_2_1B = {  # the hub config.json of Llama-3.2-1B (transformers 4.x spelling)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256}


def test_hub_llama_matches_our_preset():
    from avr_megatron.config import load_config

    m = model_config_from_hf(LLAMA_3_2_1B)
    preset = load_config(None, ["model.preset=llama3.2-1b"]).model
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size", "max_position_embeddings", "rotary_base",
                "rope_scaling", "norm_epsilon", "tie_word_embeddings"):
        assert getattr(m, key) == getattr(preset, key), key
    assert m.kv_channels == 64


def test_both_rope_spellings_read_the_same():
    new = copy.deepcopy(LLAMA_3_2_1B)
    new["rope_parameters"] = dict(new.pop("rope_scaling"), rope_theta=new.pop("rope_theta"))
    assert model_config_from_hf(new) == model_config_from_hf(LLAMA_3_2_1B)


def test_back_to_hf_keeps_base_fields_and_spelling():
    m = model_config_from_hf(LLAMA_3_2_1B)
    out = hf_config_from_model(m, torch.bfloat16, LLAMA_3_2_1B)
    assert out == LLAMA_3_2_1B
    fresh = hf_config_from_model(m, torch.float32, None, {"bos_token_id": 1})
    assert fresh["rope_scaling"]["rope_type"] == "llama3" and fresh["bos_token_id"] == 1
    assert model_config_from_hf(fresh) == m


def test_transformers_reads_our_configs_identically(tmp_path):
    from transformers import LlamaConfig

    m = model_config_from_hf(LLAMA_3_2_1B)
    for i, base in enumerate([None, LLAMA_3_2_1B]):
        (tmp_path / str(i)).mkdir()
        cfg = hf_config_from_model(m, torch.bfloat16, base, {"bos_token_id": 128000,
                                                             "eos_token_id": 128001})
        (tmp_path / str(i) / "config.json").write_text(json.dumps(cfg))
    a = LlamaConfig.from_pretrained(tmp_path / "0").to_dict()
    b = LlamaConfig.from_pretrained(tmp_path / "1").to_dict()
    assert a["rope_parameters"] == b["rope_parameters"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.mark.parametrize("change,match", [
    ({"model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts.*num_local_experts=8"),
    ({"model_type": "mistral"}, "model_type='mistral' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures=.*not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"hidden_size": "big"}, "bad value"),
])
def test_unsupported_configs_name_the_field(change, match):
    with pytest.raises(ConversionError, match="x/config.json: " + match):
        model_config_from_hf(dict(LLAMA_3_2_1B, **change), where="x/config.json")


def test_missing_field_is_named():
    bad = {k: v for k, v in LLAMA_3_2_1B.items() if k != "intermediate_size"}
    with pytest.raises(ConversionError, match="required field 'intermediate_size' is missing"):
        model_config_from_hf(bad)


def test_layout_errors_name_fields():
    m = model_config_from_hf(LLAMA_3_2_1B)
    check_layout(m, 8, 4)
    with pytest.raises(ConversionError, match=r"num_attention_heads=32 is not divisible by --tp "
                                              r"3.*num_key_value_heads=8.*intermediate_size"):
        check_layout(m, 3, 1)
    with pytest.raises(ConversionError, match="num_key_value_heads=8 is not divisible by --tp 16"):
        check_layout(m, 16, 1)
    with pytest.raises(ConversionError, match="num_hidden_layers=16 is not divisible by --pp 3"):
        check_layout(m, 1, 3)
