"""Full (unsharded) state dicts for this rank's Megatron model chunks, for tests: compare a
parallel model's weights or gradients with a single-rank one, or load the same weights into both.

Names are canonical: global layer numbers and the dist-checkpoint spelling of norms
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`), so the same
dict fits the local and the Transformer Engine layer specs. Tensor-parallel shards are cut or
joined along each parameter's `partition_dim`; which tensors stack several HF tensors per TP
shard (the SwiGLU fc1: [gate; up] in full, [gate_r; up_r] on TP rank r) is read from the
conversion table (`conversion/mapping.py`), which owns that layout. Pipeline stages exchange
their layers so every rank sees all.

Everything here materialises whole tensors: it serves tests and small models.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from avr_megatron.conversion.mapping import PARAMS
from avr_megatron.models.llama import unwrap

# Local-spec names -> canonical (= TE spec / dist checkpoint) names.
_LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


_BY_TEMPLATE = {p.megatron: p for p in PARAMS}


def _stacked_per_shard(name: str) -> int:
    """How many HF tensors each TP shard of canonical tensor `name` stacks (the mapping's `glu`
    tensors: every rank holds its rows of each, [gate_r; up_r]); 1 for the others."""
    param = _BY_TEMPLATE.get(re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.{i}.", name))
    return len(param.hf) if param is not None and param.glu else 1


def canonical_params(chunks: list[torch.nn.Module], tied: bool
                     ) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, local parameter) for every parameter this rank holds."""
    for chunk in chunks:
        model = unwrap(chunk)
        layers = model.decoder.layers if hasattr(model, "decoder") else []
        global_index = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
        for name, param in model.named_parameters():
            if tied and name == "output_layer.weight":
                continue  # the last stage's copy of the tied embedding
            match = _LAYER.match(name)
            if match:
                local, rest = int(match.group(1)), match.group(2)
                rest = _LOCAL_TO_CANONICAL.get(rest, rest)
                name = f"decoder.layers.{global_index[local]}.{rest}"
            yield name, param


def _tp_group():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def shard_for_rank(name: str, param: torch.nn.Parameter, full: torch.Tensor, tp: int,
                   rank: int) -> torch.Tensor:
    """Cut TP rank `rank`'s piece of the full tensor for this parameter."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    parts = full.chunk(_stacked_per_shard(name), dim=dim)
    return torch.cat([part.chunk(tp, dim=dim)[rank] for part in parts], dim=dim)


def join_shards(name: str, param: torch.nn.Parameter, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of shard_for_rank over all TP ranks."""
    if not getattr(param, "tensor_model_parallel", False) or len(shards) == 1:
        return shards[0]
    dim = param.partition_dim
    stacked = _stacked_per_shard(name)
    parts = [s.chunk(stacked, dim=dim) for s in shards]
    return torch.cat([p[j] for j in range(stacked) for p in parts], dim=dim)


def load_full_state_dict(chunks: list[torch.nn.Module], full: dict[str, torch.Tensor],
                         tied: bool) -> None:
    """Copy full tensors into this rank's shards. Missing or mis-shaped entries raise KeyError /
    ValueError naming the parameter."""
    from megatron.core import parallel_state

    _, tp, rank = _tp_group()
    with torch.no_grad():
        for name, param in canonical_params(chunks, tied):
            if name not in full:
                raise KeyError(f"full state dict has no tensor for {name}")
            piece = shard_for_rank(name, param, full[name], tp, rank)
            if piece.shape != param.shape:
                raise ValueError(f"{name}: shard shape {tuple(piece.shape)} does not fit parameter "
                                 f"{tuple(param.shape)}")
            param.copy_(piece.to(param.dtype))
        if tied and parallel_state.is_pipeline_last_stage(ignore_virtual=True) \
                and not parallel_state.is_pipeline_first_stage(ignore_virtual=True):
            for chunk in chunks:
                model = unwrap(chunk)
                if getattr(model, "post_process", False) and model.output_layer.weight is not None:
                    emb = full["embedding.word_embeddings.weight"]
                    model.output_layer.weight.copy_(
                        shard_for_rank("output_layer.weight", model.output_layer.weight, emb, tp,
                                       rank).to(model.output_layer.weight.dtype))


def gather_full(chunks: list[torch.nn.Module], tied: bool,
                value: Callable[[torch.nn.Parameter], torch.Tensor | None] = lambda p: p.detach()
                ) -> dict[str, torch.Tensor]:
    """Full tensors of `value(param)` (the weights by default; pass e.g. `lambda p: p.main_grad`)
    for the whole model, returned on every rank as float32 CPU tensors."""
    from megatron.core import parallel_state

    group, tp, _ = _tp_group()
    local: dict[str, torch.Tensor] = {}
    for name, param in canonical_params(chunks, tied):
        t = value(param)
        if t is None:
            continue
        t = t.detach().float().contiguous()
        if tp > 1 and getattr(param, "tensor_model_parallel", False):
            shards = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(shards, t, group=group)
            t = join_shards(name, param, shards)
        local[name] = t.cpu()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return local
    parts: list[dict] = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(parts, local, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:  # stages hold disjoint names (a tied last-stage copy is skipped above)
        merged.update(part)
    return merged
