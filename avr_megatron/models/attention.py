"""Core attention for the local (non-Transformer-Engine) layer spec: torch's
`scaled_dot_product_attention`, with packed sequences kept apart.

Megatron-Core's local `DotProductAttention` repeats K/V for grouped-query attention, builds the
[b, heads, s, s] scores with `baddbmm`, masks them with an explicit [b, 1, s, s] block mask and
runs an unfused softmax: on CPU that was ~75% of a forward pass over 1024-token bins.
`PackedSDPAttention` is a drop-in `core_attention` submodule (`local_layer_spec()`) taking the
same query/key/value ([s, b, heads, head_dim]) and returning the same [s, b, hidden].

`attention_mask` may be
  - None: plain causal attention over each row (`is_causal=True`);
  - an integer [b, s] tensor of segment ids (-1 for padding), what the trainer passes for packed
    bins: each maximal run of equal ids is one sequence (a bin's padding tail is one more), and a
    token attends causally within its own run only;
  - an integer [b, 2, s] tensor: row 0 the segment ids as above, row 1 per token the number n
    of leading tokens of the previous sequence in the same bin that this token's sequence also
    sees (0: none). That is a preference pair's shared prompt computed once
    (`avr_megatron.data.batches.collate(share_prompt=True)`): the rejected sequence's tail attends
    the chosen sequence's first n tokens, then itself causally (bottom-right aligned);
  - a bool [b, 1, s, s] mask, True = masked out (Megatron's convention), passed to SDPA as is.

Packed segments (chosen by measurement, `bench/forward_split.py` and notes in the README):
  - CPU, and GPU in fp32 or with dropout: one causal SDPA call per segment (the spans come from
    the segment ids once per micro-batch, the same boundaries as the THD cu_seqlens the TE path
    gets). It computes only the within-sequence triangles, so its cost is sum(len_i^2)/2 instead
    of s^2; on 2 CPU cores, 4 layers x 1024-token bins, forward+backward of the attention core
    took ~25-30 ms against ~95-270 ms for SDPA with a block mask (bool or additive; the mask
    forces the full s x s work and a masked kernel) and ~280-620 ms for Megatron's unfused path.
    FlexAttention has no CPU backward (torch 2.13) and needs torch.compile, so it cannot train
    here.
  - CUDA in fp16/bf16 without dropout: torch's flash varlen kernel (`torch.nn.attention.varlen`)
    over all segments of the micro-batch in one call, from the same cu_seqlens (one kernel
    launch per layer instead of one per sequence; GQA natively). Not exercised by CI (no GPU);
    its layout handling is tested on CPU against the per-segment path. It cannot express a shared
    prefix: micro-batches with one take the per-segment path.
K/V are never repeated for grouped-query attention (`enable_gqa=True`), and no [s, s] score
tensor is built in Python-level ops.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.nn.attention.varlen import varlen_attn as _varlen_attn  # CUDA only (torch >= 2.10)

from avr_megatron.models.packed import cu_seqlens


class _Spans:
    """cu_seqlens (and each sequence's shared-prefix length) of the last segment-id mask seen:
    every layer of a forward (and its activation recompute) gets the same tensor, so the
    boundaries are read to the host once per micro-batch."""

    def __init__(self):
        self._ref, self._version, self._value = None, -1, None

    def get(self, mask: torch.Tensor):
        """(cu_seqlens, its list, longest, shared prefix per sequence or None)."""
        if self._ref is not None and self._ref() is mask and self._version == mask._version:
            return self._value
        segment = mask if mask.dim() == 2 else mask[:, 0]
        cu, longest = cu_seqlens(segment)
        shared = None
        if mask.dim() == 3:
            shared = mask[:, 1].reshape(-1)[cu[:-1].long()].tolist()
            if not any(shared):
                shared = None
        self._value = (cu, cu.tolist(), longest, shared)
        self._ref, self._version = weakref.ref(mask), mask._version
        return self._value


_spans = _Spans()


class PackedSDPAttention(DotProductAttention):
    """`DotProductAttention` (same constructor, scale, dropout and state dict) with a forward
    through `scaled_dot_product_attention`; see the module docstring for the mask forms."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, *args, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, *args, **kwargs)
        if self.softmax_offset is not None or config.softmax_type != "vanilla":
            raise ValueError(f"PackedSDPAttention supports softmax_type='vanilla' only, not "
                             f"{config.softmax_type!r}")
        if self.scale_mask_softmax.window_size is not None:
            raise ValueError("PackedSDPAttention does not implement sliding-window attention")
        self.gqa = self.num_attention_heads_per_partition != self.num_query_groups_per_partition

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("THD packed sequences need Transformer Engine; the local spec takes "
                             "packed bins as [b, s] segment ids in attention_mask")
        if attention_bias is not None:
            raise ValueError("PackedSDPAttention does not take an attention bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        s, b, heads, dim = query.shape
        dropout = self.attention_dropout.p if self.training else 0.0
        kw = dict(scale=self.softmax_scale, enable_gqa=self.gqa)
        with self._dropout_rng(dropout):
            if attention_mask is None:
                if mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
                    raise ValueError(f"attn_mask_type {mask_type} needs an attention_mask")
                out = F.scaled_dot_product_attention(
                    *_bhsd(query, key, value), dropout_p=dropout,
                    is_causal=mask_type == AttnMaskType.causal, **kw)
            elif attention_mask.dtype == torch.bool:
                out = F.scaled_dot_product_attention(
                    *_bhsd(query, key, value), attn_mask=~attention_mask, dropout_p=dropout, **kw)
            else:
                if mask_type != AttnMaskType.causal:
                    raise ValueError("segment ids give causal attention within each sequence; "
                                     f"attn_mask_type is {mask_type}")
                if attention_mask.shape not in ((b, s), (b, 2, s)):
                    raise ValueError(f"segment ids must be [b, s] = [{b}, {s}] or [b, 2, s] "
                                     f"(with shared prefixes), got "
                                     f"{tuple(attention_mask.shape)}")
                if self._use_varlen(query, dropout) and _spans.get(attention_mask)[3] is None:
                    return self._varlen(query, key, value, attention_mask)
                return self._per_segment(query, key, value, attention_mask, dropout, kw)
        # [b, heads, s, dim] -> [s, b, heads * dim]
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)

    def _dropout_rng(self, dropout: float):
        """Attention dropout draws from the model-parallel RNG tracker like Megatron's path."""
        if dropout > 0 and not self.config.sequence_parallel:
            from megatron.core import tensor_parallel

            return tensor_parallel.get_cuda_rng_tracker().fork()
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def _use_varlen(query: torch.Tensor, dropout: float) -> bool:
        return (query.is_cuda and dropout == 0.0
                and query.dtype in (torch.float16, torch.bfloat16))

    def _per_segment(self, query, key, value, mask, dropout, kw):
        """One causal SDPA call per sequence of each bin -> [s, b, heads * dim]. A sequence with
        a shared prefix of n tokens attends the previous sequence's first n keys too.

        Each row's q/k/v are cut into sequences with one `split` (its backward is one `cat` of
        the pieces' gradients; a slice per sequence would give every piece a zero-filled
        full-length gradient to add up), and the pieces' outputs are joined in the [s, b, heads,
        dim] layout the caller returns, so no further copy is needed."""
        s, b, heads, dim = query.shape
        q, k, v = _bhsd(query, key, value)
        _, bounds, _, shared = _spans.get(mask)
        rows = []
        for r in range(b):
            lo = r * s
            index = [i for i, a in enumerate(bounds[:-1]) if lo <= a < lo + s]
            lengths = [bounds[i + 1] - bounds[i] for i in index]
            # 4-d pieces [1, heads, len, dim]: torch's CPU flash kernel takes 4-d inputs only
            # (3-d ones fall back to the unfused math path)
            pieces = [t[r:r + 1].split(lengths, dim=2) for t in (q, k, v)]
            parts = []
            for j, (i, qs, ks, vs) in enumerate(zip(index, *pieces)):
                n = shared[i] if shared else 0
                if n == 0:
                    out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout,
                                                         is_causal=True, **kw)
                else:
                    if j == 0 or n > lengths[j - 1]:
                        raise ValueError(f"a sequence shares {n} tokens with the previous one "
                                         "in its bin, which is shorter or absent")
                    ks = torch.cat([pieces[1][j - 1][:, :, :n], ks], dim=2)
                    vs = torch.cat([pieces[2][j - 1][:, :, :n], vs], dim=2)
                    # query j sees the n shared keys and its own sequence up to itself
                    allowed = torch.ones(lengths[j], n + lengths[j], dtype=torch.bool,
                                         device=q.device).tril_(diagonal=n)
                    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed,
                                                         dropout_p=dropout, **kw)
                parts.append(out.permute(2, 0, 1, 3))  # [len, 1, heads, dim]
            rows.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        return out.reshape(s, b, heads * dim)

    def _varlen(self, query, key, value, segment):
        """All sequences of the micro-batch in one flash varlen call (CUDA, fp16/bf16)."""
        s, b, heads, dim = query.shape
        cu, _, longest, _ = _spans.get(segment)
        cu = cu.to(query.device)
        flat = [t.transpose(0, 1).reshape(b * s, t.shape[2], dim).contiguous()
                for t in (query, key, value)]
        out = _varlen_attn(*flat, cu, cu, longest, longest, scale=self.softmax_scale,
                           window_size=(-1, 0), enable_gqa=self.gqa)
        return out.reshape(b, s, heads * dim).transpose(0, 1).contiguous()


def _bhsd(*tensors):
    """[s, b, heads, dim] views as [b, heads, s, dim]."""
    return [t.permute(1, 2, 0, 3) for t in tensors]


def local_layer_spec():
    """Megatron-Core's local GPT layer spec (RMSNorm) with `PackedSDPAttention` as core
    attention and `RotaryOnceSelfAttention` (RoPE from one cos/sin table per forward)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from avr_megatron.models.positions import RotaryOnceSelfAttention

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.module = RotaryOnceSelfAttention
    spec.submodules.self_attention.submodules.core_attention = PackedSDPAttention
    return spec
