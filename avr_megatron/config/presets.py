"""Llama-family model shapes by name. Plain data, no torch: recipes pick one with
`model.preset=NAME` and any key set next to it overrides the preset's value."""

from __future__ import annotations

_LLAMA3_ROPE = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters: CPU tests and the tiny pipeline. Rope scaling is on so
    # every test exercises the Llama-3 frequency remapping.
    "tiny": {
        "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
        "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 512,
        "max_position_embeddings": 1024, "rotary_base": 500000.0,
        # original length 256 (< max positions, as transformers requires) puts the 8 frequency
        # pairs of a 16-wide head in all three bands: kept, smoothed and divided by the factor.
        "rope_scaling": dict(_LLAMA3_ROPE, original_max_position_embeddings=256),
        "norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama3.2-1b": {
        "num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 8192,
        "num_attention_heads": 32, "num_query_groups": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rotary_base": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE, factor=32.0), "norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama3.2-3b": {
        "num_layers": 28, "hidden_size": 3072, "ffn_hidden_size": 8192,
        "num_attention_heads": 24, "num_query_groups": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rotary_base": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE, factor=32.0), "norm_epsilon": 1e-5,
        "tie_word_embeddings": True,
    },
    "llama3.1-8b": {
        "num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 14336,
        "num_attention_heads": 32, "num_query_groups": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rotary_base": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE), "norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama3.1-70b": {
        "num_layers": 80, "hidden_size": 8192, "ffn_hidden_size": 28672,
        "num_attention_heads": 64, "num_query_groups": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rotary_base": 500000.0,
        "rope_scaling": dict(_LLAMA3_ROPE), "norm_epsilon": 1e-5,
        "tie_word_embeddings": False,
    },
}


def preset(name: str) -> dict:
    """The model keys of preset `name` (a copy)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    import copy

    return copy.deepcopy(PRESETS[name])
