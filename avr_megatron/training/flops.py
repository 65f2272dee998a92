"""Model FLOPs of a training step, for the MFU estimate (GPU only).

Counts matrix multiplies of a Llama-style decoder on the real (non-pad) tokens: QKV with grouped
KV heads, attention scores and values over each packed sequence (causal: half of l^2), output
projection, gated MLP, LM head; training costs 3x the forward (backward = 2x), and an online
reference adds one more forward. Recompute is not counted (MFU counts model FLOPs).
"""

from __future__ import annotations

from avr_megatron.config.schema import ModelConfig

# Dense bf16 peak TFLOP/s per device (FP8: twice); matched against the CUDA device name.
PEAK_BF16_TFLOPS = (("B200", 2250.0), ("H200", 989.4), ("H100", 989.4), ("H800", 989.4),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


def forward_flops(m: ModelConfig, real_tokens: int, sum_sq_lengths: int) -> float:
    h, layers = m.hidden_size, m.num_layers
    head_dim = m.kv_channels or h // m.num_attention_heads
    q, kv = m.num_attention_heads * head_dim, m.num_query_groups * head_dim
    per_token_params = layers * (h * (q + 2 * kv) + q * h + 3 * h * m.ffn_hidden_size) \
        + h * m.vocab_size
    attention = layers * 2 * 2 * q * sum_sq_lengths / 2  # QK^T and PV, causal half
    return 2.0 * per_token_params * real_tokens + attention


def peak_flops(device_name: str | None, fp8: bool, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12 * (2 if fp8 else 1)
    return None
