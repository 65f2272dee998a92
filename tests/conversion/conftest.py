"""Tiny random HF Llamas covering what conversion must get right, built once per session."""

from pathlib import Path

import pytest

# name -> make_tiny_llama keyword arguments
CASES = {
    # GQA (2 heads per group), untied, Llama-3 rope scaling, vocab 384 padded to 512.
    "gqa_untied": {},
    # Tied embeddings, plain multi-head attention, default rope, vocab 384 padded to 512.
    "tied_mha": {"tie_word_embeddings": True, "num_kv_heads": 4, "rope_scaling": False},
    # 4 query heads per group, head_dim != hidden / heads, 4 layers, vocab 512 (no padding).
    "gqa4_headdim": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 32, "num_layers": 4,
                     "intermediate_size": 96, "vocab_size": 512},
}


@pytest.fixture(params=list(CASES))
def case(request) -> str:
    """Each test using it runs once per tiny-model case."""
    return request.param


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer

    return train_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tokenizer_dir):
    """tiny_hf(case) -> HF directory of that case (built once)."""
    from avr_megatron.testing.tiny_hf import make_tiny_llama

    built: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in built:
            built[case] = make_tiny_llama(tmp_path_factory.mktemp(f"hf_{case}"), tokenizer_dir,
                                          seed=len(built), **CASES[case])
        return built[case]

    return get


def reference_megatron_weights(hf: dict, m) -> dict:
    """Canonical Megatron tensors built from HF tensors by hand (independently of
    avr_megatron.conversion.mapping): QKV grouped per query group, fc1 = [gate; up], vocab
    tensors WITHOUT their padded rows (compare those on [:vocab_size])."""
    import torch

    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups
    per = m.num_attention_heads // groups
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not m.tie_word_embeddings:
        out["output_layer.weight"] = hf["lm_head.weight"]
    for i in range(m.num_layers):
        p, L = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        rows = []
        for g in range(groups):
            rows += [q[h * d:(h + 1) * d] for h in range(g * per, (g + 1) * per)]
            rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        out[L + "self_attention.linear_qkv.weight"] = torch.cat(rows)
        out[L + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
        out[L + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[L + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
        out[L + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                      hf[p + "mlp.up_proj.weight"]])
        out[L + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out


def assert_same_weights(megatron: dict, reference: dict, vocab_size: int) -> None:
    """Bit-identical, padded vocab rows excluded."""
    import torch

    assert megatron.keys() == reference.keys(), megatron.keys() ^ reference.keys()
    for name, ref in reference.items():
        got = megatron[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            got = got[:vocab_size]
        assert got.shape == ref.shape and torch.equal(got, ref.to(got.dtype)), name


@pytest.fixture(scope="session")
def reference():
    """reference.weights(hf_state_dict, model_cfg) / reference.assert_same(megatron, ref, vocab)"""
    from types import SimpleNamespace

    return SimpleNamespace(weights=reference_megatron_weights, assert_same=assert_same_weights)
