"""A minimal Hugging Face Llama -> canonical Megatron name mapping FOR TESTS: an
independent reference that training and conversion tests compare against (a Megatron model fed
the same weights as `transformers`; the converter's own mapping table). Production
conversion (both directions, sharded safetensors, validation) is avr_megatron.conversion.

Megatron's fused QKV weight is laid out per query group: [q heads of the group; k; v]; the
SwiGLU fc1 weight is [gate; up]; embedding and output rows are padded to the padded vocabulary
(padded rows are zeros; losses never look at them).
"""

from __future__ import annotations

import torch


def hf_to_canonical(hf: dict[str, torch.Tensor], *, num_layers: int, num_heads: int,
                    num_groups: int, padded_vocab: int, tied: bool = False
                    ) -> dict[str, torch.Tensor]:
    def pad(w):
        out = torch.zeros(padded_vocab, w.shape[1], dtype=w.dtype)
        out[: w.shape[0]] = w
        return out

    out = {"embedding.word_embeddings.weight": pad(hf["model.embed_tokens.weight"]),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}
    if not tied:
        out["output_layer.weight"] = pad(hf["lm_head.weight"])
    for i in range(num_layers):
        p = f"model.layers.{i}."
        q, k, v = (hf[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        head_dim = k.shape[0] // num_groups
        per = num_heads // num_groups
        qkv = []
        for g in range(num_groups):
            qkv += [q[g * per * head_dim:(g + 1) * per * head_dim],
                    k[g * head_dim:(g + 1) * head_dim], v[g * head_dim:(g + 1) * head_dim]]
        d = f"decoder.layers.{i}."
        out[d + "self_attention.linear_qkv.weight"] = torch.cat(qkv)
        out[d + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
        out[d + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        out[d + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
        out[d + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                     hf[p + "mlp.up_proj.weight"]])
        out[d + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    return out
