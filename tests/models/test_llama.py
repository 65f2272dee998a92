"""Single-process model checks: shapes, vocab padding, Llama-3 RoPE frequencies against the
transformers implementation, and clear errors for GPU-only options."""

import pytest
import torch

from avr_megatron.config import ConfigError, load_config
from avr_megatron.models.llama import llama3_inv_freq, padded_vocab_size, uses_transformer_engine


@pytest.mark.parametrize("vocab,padded", [(512, 512), (300, 384), (128256, 128256), (129, 256)])
def test_padded_vocab(vocab, padded):
    cfg = load_config(None, [f"model.vocab_size={vocab}"])
    assert padded_vocab_size(cfg.model) == padded


@pytest.mark.parametrize("factor,low,high,orig,base,dim", [
    (8.0, 1.0, 4.0, 8192, 500000.0, 128),
    (32.0, 1.0, 4.0, 8192, 500000.0, 64),
    (8.0, 1.0, 4.0, 256, 500000.0, 16),
    (4.0, 2.0, 8.0, 1024, 10000.0, 32),
])
def test_llama3_inv_freq_matches_transformers(factor, low, high, orig, base, dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, max_position_embeddings=2 * orig,
                     rope_parameters={"rope_type": "llama3", "rope_theta": base, "factor": factor,
                                      "low_freq_factor": low, "high_freq_factor": high,
                                      "original_max_position_embeddings": orig})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = load_config(None, ["model.rope_scaling.type=llama3", f"model.rope_scaling.factor={factor}",
                             f"model.rope_scaling.low_freq_factor={low}",
                             f"model.rope_scaling.high_freq_factor={high}",
                             f"model.rope_scaling.original_max_position_embeddings={orig}"])
    ours = llama3_inv_freq(dim, base, cfg.model.rope_scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)


def test_gpu_only_options_need_transformer_engine():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ConfigError, match="precision.fp8='e4m3' needs Transformer Engine"):
        uses_transformer_engine(load_config(None, ["precision.fp8=e4m3"]))
    with pytest.raises(ConfigError, match="model.transformer_impl='transformer_engine'"):
        uses_transformer_engine(load_config(None, ["model.transformer_impl=transformer_engine"]))
    with pytest.raises(ConfigError, match="context_parallel_size > 1 needs"):
        uses_transformer_engine(load_config(None, ["parallel.context_parallel_size=2"]))
    assert uses_transformer_engine(load_config(None, [])) is False


@pytest.mark.parametrize("gpu,kernel,expected", [(True, True, True), (True, False, False),
                                                 (False, True, False)])
def test_grad_accumulation_fusion_only_with_gpu_and_apex_kernel(monkeypatch, gpu, kernel,
                                                                expected):
    """Megatron's ColumnParallelLinear (the output layer on every spec) raises at build time when
    gradient_accumulation_fusion is on without APEX's fused_weight_gradient_mlp_cuda."""
    import sys
    import types

    import avr_megatron.models.llama as llama

    monkeypatch.setattr(llama, "on_gpu", lambda: gpu)
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda",
                        types.ModuleType("fused_weight_gradient_mlp_cuda") if kernel else None)
    llama.grad_accumulation_fusion_available.cache_clear()
    try:
        assert llama.grad_accumulation_fusion_available() is expected
        cfg = load_config(None, ["model.preset=tiny"])
        assert llama.transformer_config(cfg, use_te=False).gradient_accumulation_fusion is expected
    finally:
        llama.grad_accumulation_fusion_available.cache_clear()


def test_mxfp8_is_refused_on_hopper_before_any_work(monkeypatch):
    import avr_megatron.models.llama as llama

    monkeypatch.setattr(llama, "transformer_engine_status", lambda: (True, "available"))
    monkeypatch.setattr(llama, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    cfg = load_config(None, ["precision.bf16=true", "precision.fp8=e4m3",
                             "precision.fp8_recipe=mxfp8"])
    with pytest.raises(ConfigError, match="fp8_recipe='mxfp8' on NVIDIA H100.*Blackwell"):
        uses_transformer_engine(cfg)
    cfg.precision.fp8_recipe = "delayed"
    assert uses_transformer_engine(cfg)
