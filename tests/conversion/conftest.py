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
    """Canonical Megatron tensors built from HF tensors by the test-side mapping (independent of
    avr_megatron.conversion.mapping), vocab tensors WITHOUT their padded rows (compare those on
    [:vocab_size])."""
    from avr_megatron.testing.hf_llama_weights import hf_to_canonical

    return hf_to_canonical(hf, num_layers=m.num_layers, num_heads=m.num_attention_heads,
                           num_groups=m.num_query_groups, padded_vocab=m.vocab_size,
                           tied=m.tie_word_embeddings)


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
