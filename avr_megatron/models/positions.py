"""RoPE by position ids on the local layer spec.

Megatron-Core's GPTModel rotates every token by its index in the row and ignores
`position_ids`. For packed bins of separate sequences that is enough (scores depend only on the
distance between query and key, the same within a sequence wherever it sits in the row), but a
preference pair whose shared prompt is computed once (`collate(share_prompt=True)`) has the
rejected sequence's tail attend the chosen sequence's prompt from further along the row: only
rotating each token by its own position in its sequence gives the right distances.
`PositionalRoPEGPTModel` gathers the rotary table by `position_ids` ([b, s] -> freqs
[s, b, 1, dim], which Megatron's unfused RoPE broadcasts per token); with `position_ids` None it
is GPTModel. The Transformer Engine (THD) path restarts positions per sequence itself and keeps
GPTModel.
"""

from __future__ import annotations

import weakref

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.attention import SelfAttention


class PositionalRoPEGPTModel(GPTModel):
    """GPTModel whose rotary embedding follows `position_ids` (see the module docstring)."""

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        emb = out[1]
        if position_ids is None or not isinstance(emb, torch.Tensor):
            return out
        if position_ids.device.type == "cpu" and int(position_ids.max()) >= emb.shape[0]:
            emb = self.rotary_pos_emb(int(position_ids.max()) + 1)
        freqs = emb[position_ids.t().to(emb.device), 0, 0]  # [s, b, dim]
        return (out[0], freqs.unsqueeze(2)) + tuple(out[2:])


class _RotaryTable:
    """cos/sin of the last rotary table seen (scaled by mscale, in the activations' dtype):
    every layer of a forward gets the same freqs tensor, so they are computed once per forward
    instead of once per layer and per query/key as Megatron's unfused RoPE does."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, freqs: torch.Tensor, mscale: float, dtype: torch.dtype):
        key = (weakref.ref(freqs), freqs._version, mscale, dtype)
        if self._key is not None and self._key[0]() is freqs and self._key[1:] == key[1:]:
            return self._value
        self._value = ((torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype))
        self._key = key
        return self._value


_table = _RotaryTable()


class RotaryOnceSelfAttention(SelfAttention):
    """Megatron's SelfAttention with its unfused RoPE applied from a cos/sin table computed
    once per forward (`_RotaryTable`): q * cos + rotate_half(q) * sin, the same arithmetic as
    `rope_utils._apply_rotary_pos_emb_bshd` (bitwise equal outputs) without recomputing cos/sin
    and the mscale products in every layer for q and k nor copying q and k once more through a
    cat with an empty pass-through part. The local spec's training step spends ~3% less
    (measured in the issue-18 notes). Anything else (THD packed sequences, inference contexts,
    interleaved or partial rotary, fused RoPE) goes through SelfAttention unchanged."""

    _freqs = None

    def _rotates_here(self, freqs, kwargs) -> bool:
        c = self.config
        return (isinstance(freqs, torch.Tensor) and freqs.dim() == 4
                and freqs.shape[-1] == self.hidden_size_per_attention_head
                and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None
                and kwargs.get("packed_seq_params") is None
                and kwargs.get("rotary_pos_cos") is None
                and not (c.apply_rope_fusion or c.rotary_interleaved or c.multi_latent_attention
                         or c.fused_single_qkv_rope or c.flash_decode))

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        freqs = kwargs.get("rotary_pos_emb")
        if args or not self._rotates_here(freqs, kwargs):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        self._freqs = freqs
        try:
            return super().forward(hidden_states, attention_mask,
                                   **{**kwargs, "rotary_pos_emb": None})
        finally:
            self._freqs = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        if self._freqs is None:
            return out
        query, key = out[0], out[1]
        cos, sin = _table.get(self._freqs, self._yarn_concentration_factor, query.dtype)
        return (_rotate(query, cos, sin), _rotate(key, cos, sin)) + tuple(out[2:])


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin, rotate_half as Megatron's (non-interleaved)."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin
