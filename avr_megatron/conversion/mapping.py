"""The one table between Hugging Face Llama tensor names and our canonical Megatron names.

Every Megatron tensor is a stack, along dim 0, of row ranges ("segments") of one or more HF
tensors, plus zero rows for vocab padding. The table says which HF tensors and which stacking
(`Layout`); `segments()` turns that into the row plan, and the same plan is read in both
directions: `merge_rows` builds any Megatron row range from HF reads (HF -> Megatron) and
`split_rows` cuts Megatron rows back into HF row pieces (Megatron -> HF). Nothing else in the
package knows how QKV is grouped or fc1 is stacked.

    linear_qkv  = for each query group g: [q heads of g; k_g; v_g]   (Megatron's GQA layout)
    linear_fc1  = [gate; up]                                        (SwiGLU)
    embeddings / output layer = [HF rows; zero rows up to the padded vocab]

Padded vocab rows are zeros on import (they are never looked up, and their logits are masked
from every log-prob; zeros keep conversion deterministic) and dropped on export.

Shapes are written with symbols: H hidden, F ffn, V vocab, VP padded vocab, Q = heads x head
dim, KV = query groups x head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

import torch

from avr_megatron.config.schema import ModelConfig
from avr_megatron.models.llama import padded_vocab_size


class Layout(Enum):
    SAME = "same"                # one HF tensor, same shape
    STACK = "stack"              # HF tensors stacked along dim 0 in table order ([gate; up])
    GROUPED_QKV = "grouped_qkv"  # per query group: [q rows of the group; k_g; v_g]
    VOCAB = "vocab"              # HF rows, then zero rows up to the padded vocab


@dataclass(frozen=True)
class Param:
    megatron: str                             # canonical name; "{i}" = global layer number
    hf: tuple[tuple[str, tuple[str, ...]], ...]  # (HF name, symbolic shape), stacking order
    layout: Layout = Layout.SAME
    tp_dim: int | None = None                 # Megatron tensor-parallel partition dim
    glu: bool = False                         # fc1: TP rank r holds [gate_r; up_r]
    extra_state: bool = False                 # its module saves an `_extra_state` object (TE spec)
    untied_only: bool = False                 # absent when embeddings are tied


_L = "model.layers.{i}."
PARAMS: tuple[Param, ...] = (
    Param("embedding.word_embeddings.weight",
          (("model.embed_tokens.weight", ("V", "H")),), Layout.VOCAB, tp_dim=0),
    Param("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
          ((_L + "input_layernorm.weight", ("H",)),)),
    Param("decoder.layers.{i}.self_attention.linear_qkv.weight",
          ((_L + "self_attn.q_proj.weight", ("Q", "H")),
           (_L + "self_attn.k_proj.weight", ("KV", "H")),
           (_L + "self_attn.v_proj.weight", ("KV", "H"))),
          Layout.GROUPED_QKV, tp_dim=0, extra_state=True),
    Param("decoder.layers.{i}.self_attention.linear_proj.weight",
          ((_L + "self_attn.o_proj.weight", ("H", "Q")),), tp_dim=1, extra_state=True),
    Param("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
          ((_L + "post_attention_layernorm.weight", ("H",)),)),
    Param("decoder.layers.{i}.mlp.linear_fc1.weight",
          ((_L + "mlp.gate_proj.weight", ("F", "H")), (_L + "mlp.up_proj.weight", ("F", "H"))),
          Layout.STACK, tp_dim=0, glu=True, extra_state=True),
    Param("decoder.layers.{i}.mlp.linear_fc2.weight",
          ((_L + "mlp.down_proj.weight", ("H", "F")),), tp_dim=1, extra_state=True),
    # Under Transformer Engine the final norm is TE's RMSNorm, which has `_extra_state` (the
    # local spec's norm has none; the extra object does not disturb a local-spec load).
    Param("decoder.final_layernorm.weight", (("model.norm.weight", ("H",)),), extra_state=True),
    Param("output_layer.weight", (("lm_head.weight", ("V", "H")),), Layout.VOCAB, tp_dim=0,
          untied_only=True),
)

# HF tensors that carry nothing: present in some checkpoints, never converted.
IGNORED_HF = (".rotary_emb.inv_freq",)
# An HF `lm_head.weight` saved beside tied embeddings is a copy transformers ignores.
TIED_HF_COPY = "lm_head.weight"


def head_dim(m: ModelConfig) -> int:
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def dims(m: ModelConfig) -> dict[str, int]:
    d = head_dim(m)
    return {"H": m.hidden_size, "F": m.ffn_hidden_size, "V": m.vocab_size,
            "VP": padded_vocab_size(m), "Q": m.num_attention_heads * d,
            "KV": m.num_query_groups * d}


@dataclass(frozen=True)
class Segment:
    hf: int | None  # index into the tensor's HF list; None: zero rows (vocab padding)
    hf_start: int   # first row within that HF tensor
    rows: int


@dataclass(frozen=True)
class ModelTensor:
    """One Megatron tensor of a concrete model and the HF tensors it is made of."""

    param: Param
    name: str                              # canonical Megatron name
    layer: int | None
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]                 # full (unsharded, padded) Megatron shape
    segments: tuple[Segment, ...]          # Megatron rows, in order

    def merge_rows(self, read: Callable[[str, int, int], torch.Tensor], start: int, stop: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """Megatron rows [start, stop) from HF reads: read(hf_name, first_row, end_row)."""
        pieces, pos = [], 0
        for seg in self.segments:
            lo, hi = max(start, pos), min(stop, pos + seg.rows)
            if lo < hi:
                if seg.hf is None:
                    pieces.append(torch.zeros((hi - lo, *self.shape[1:]), dtype=dtype))
                else:
                    a = seg.hf_start + lo - pos
                    pieces.append(read(self.hf_names[seg.hf], a, a + hi - lo).to(dtype))
            pos += seg.rows
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def split_rows(self, data: torch.Tensor, start: int = 0
                   ) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(HF name, first HF row, rows) pieces of Megatron rows [start, start + len(data)),
        padding dropped, in Megatron row order."""
        stop, pos = start + data.shape[0], 0
        for seg in self.segments:
            lo, hi = max(start, pos), min(stop, pos + seg.rows)
            if lo < hi and seg.hf is not None:
                yield self.hf_names[seg.hf], seg.hf_start + lo - pos, data[lo - start:hi - start]
            pos += seg.rows


def _segments(param: Param, m: ModelConfig, hf_shapes: list[tuple[int, ...]]) -> list[Segment]:
    if param.layout is Layout.SAME:
        return [Segment(0, 0, hf_shapes[0][0])]
    if param.layout is Layout.STACK:
        return [Segment(j, 0, s[0]) for j, s in enumerate(hf_shapes)]
    if param.layout is Layout.VOCAB:
        pad = padded_vocab_size(m) - m.vocab_size
        return [Segment(0, 0, m.vocab_size)] + ([Segment(None, 0, pad)] if pad else [])
    d, groups = head_dim(m), m.num_query_groups
    per_group = m.num_attention_heads // groups
    out = []
    for g in range(groups):
        out += [Segment(0, g * per_group * d, per_group * d), Segment(1, g * d, d),
                Segment(2, g * d, d)]
    return out


# File order: embeddings, then every layer's tensors in table order, final norm, output layer.
_ORDER = {"embedding.word_embeddings.weight": 0, "decoder.final_layernorm.weight": 2,
          "output_layer.weight": 3}


def model_tensors(m: ModelConfig) -> list[ModelTensor]:
    """Every Megatron tensor of model `m`, in HF file order (embeddings, layers, norm, head)."""
    sym = dims(m)
    out = []
    for param in PARAMS:
        if param.untied_only and m.tie_word_embeddings:
            continue
        layers = range(m.num_layers) if "{i}" in param.megatron else [None]
        for i in layers:
            hf_names = tuple(n.format(i=i) for n, _ in param.hf)
            hf_shapes = [tuple(sym[s] for s in shape) for _, shape in param.hf]
            segs = _segments(param, m, hf_shapes)
            shape = (sum(s.rows for s in segs), *hf_shapes[0][1:])
            out.append(ModelTensor(param, param.megatron.format(i=i), i, hf_names,
                                   tuple(hf_shapes), shape, tuple(segs)))
    return sorted(out, key=lambda t: (_ORDER.get(t.name, 1), t.layer or 0))


def expected_hf(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor an HF checkpoint of `m` must hold."""
    return {n: s for t in model_tensors(m) for n, s in zip(t.hf_names, t.hf_shapes)}
