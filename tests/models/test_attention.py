"""SDPA core attention (models/attention.py) equals Megatron-Core's own unfused local attention:
packed bins with padding under grouped-query attention (logits everywhere, every gradient), plain
causal rows, an explicit bool mask and activation recompute; the CUDA varlen path's layout
handling is checked on CPU against the per-segment path with an emulated kernel; shared
prefixes (a pair's prompt computed once) equal SDPA with the explicit mask. The reference is
Megatron's stock local spec, so the RoPE of RotaryOnceSelfAttention is checked against
Megatron's unfused RoPE too."""

import pytest
import torch

from avr_megatron.models.packed import cu_seqlens
from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

S = 48
# three bins: two sequences + padding, one full sequence, three sequences + padding
LAYOUT = [[(0, 17), (1, 22), (-1, 9)], [(2, 48)], [(3, 5), (4, 1), (5, 33), (-1, 9)]]


def _segments():
    rows = []
    for row in LAYOUT:
        rows.append(torch.cat([torch.full((n,), s, dtype=torch.long) for s, n in row]))
    return torch.stack(rows)


def _build(cfg, weights=None, unfused=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from avr_megatron.models import llama
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime.distributed import initialize

    initialize(cfg)
    saved = llama.layer_spec
    if unfused:  # Megatron-Core's stock local spec: DotProductAttention with an explicit mask
        llama.layer_spec = lambda use_te: get_gpt_layer_local_spec(normalization="RMSNorm")
    try:
        chunks = llama.build_model(cfg)
    finally:
        llama.layer_spec = saved
    if weights is None:
        weights = gather_full(chunks, False)
    else:
        load_full_state_dict(chunks, weights, False)
    return chunks[0], weights


def _run(model, tokens, mask):
    from avr_megatron.testing.state import gather_full

    model.zero_grad(set_to_none=True)
    positions = torch.arange(S).expand_as(tokens)
    logits = model(tokens, positions, mask)
    # a loss that reaches every position and every logit with different weights
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * w).sum().backward()
    return logits.detach(), gather_full([model], False, value=lambda p: p.grad)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _case():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from avr_megatron.config import load_config
    from avr_megatron.data.batches import block_causal_mask
    from avr_megatron.models import attention
    from avr_megatron.models.llama import unwrap

    cfg = load_config(None, ["model.preset=tiny", f"train.seq_length={S}"])
    seg = _segments()
    tokens = torch.randint(0, 512, seg.shape, generator=torch.Generator().manual_seed(0))
    ours, weights = _build(cfg)
    core = unwrap(ours).decoder.layers[0].self_attention.core_attention
    ref, _ = _build(cfg, weights, unfused=True)
    result = {"core": type(core).__name__, "gqa": core.gqa,
              "attention": type(unwrap(ours).decoder.layers[0].self_attention).__name__,
              "ref_attention": type(unwrap(ref).decoder.layers[0].self_attention).__name__}
    assert type(unwrap(ref).decoder.layers[0].self_attention.core_attention) is DotProductAttention

    out = {}
    out["packed"] = (_run(ours, tokens, seg), _run(ref, tokens, block_causal_mask(seg)))
    out["causal"] = (_run(ours, tokens, None), _run(ref, tokens, None))
    out["bool_mask"] = (_run(ours, tokens, block_causal_mask(seg)),
                        _run(ref, tokens, block_causal_mask(seg)))
    recompute, _ = _build(load_config(None, [
        "model.preset=tiny", f"train.seq_length={S}", "model.recompute_granularity=full",
        "model.recompute_method=uniform", "model.recompute_num_layers=1"]), weights)
    out["packed_recompute"] = (_run(recompute, tokens, seg), out["packed"][1])
    for name, ((lo, go), (lr, gr)) in out.items():
        result[name] = {"logits": _rel(lo, lr),
                        "grads": max(_rel(go[k], gr[k]) for k in gr)}
    # packing changes nothing: each sequence alone (plain causal) gives the same logits
    with torch.no_grad():
        packed = ours(tokens, torch.arange(S).expand_as(tokens), seg)
        errs = []
        for r, row in enumerate(LAYOUT):
            start = 0
            for s, n in row:
                if s >= 0:
                    alone = ours(tokens[r:r + 1, start:start + n], torch.arange(n)[None], None)
                    errs.append(_rel(packed[r:r + 1, start:start + n], alone))
                start += n
    result["packed_vs_alone"] = max(errs)
    # a micro-batch trimmed to its fullest row (collate(trim=True)) computes the same tokens
    rows = [0, 2]  # the bins with padding: their fullest holds 39 of 48 tokens
    width = max(sum(n for s, n in LAYOUT[r] if s >= 0) for r in rows)
    with torch.no_grad():
        cut = ours(tokens[rows, :width], torch.arange(width).expand(len(rows), -1),
                   seg[rows, :width])
    real = seg[rows, :width] >= 0
    result["trimmed_vs_full"] = _rel(cut[real], packed[rows, :width][real])
    result["trimmed_width"] = width

    # the varlen (CUDA) path's layout, with a CPU stand-in for the flash varlen kernel
    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
        assert window_size == (-1, 0) and enable_gqa and torch.equal(cu_q, cu_k)
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        cu = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(t[a:e].transpose(0, 1)[None] for t in (q, k, v)), scale=scale, is_causal=True,
            enable_gqa=True)[0].transpose(0, 1) for a, e in zip(cu, cu[1:])])

    g = torch.Generator().manual_seed(2)
    heads, groups, dim = 4, 2, 16
    q = torch.randn(S, len(LAYOUT), heads, dim, generator=g)
    k, v = (torch.randn(S, len(LAYOUT), groups, dim, generator=g) for _ in range(2))
    per_segment = core(q, k, v, seg)
    attention._varlen_attn, saved = fake_varlen, attention._varlen_attn
    type(core)._use_varlen, saved_use = staticmethod(lambda query, dropout: True), \
        type(core)._use_varlen
    try:
        varlen = core(q, k, v, seg)
    finally:
        attention._varlen_attn, type(core)._use_varlen = saved, saved_use
    result["varlen_layout"] = _rel(varlen, per_segment)
    result["varlen_shape"] = tuple(varlen.shape) == tuple(per_segment.shape) == (S, 3, 64)

    # shared prefixes ([b, 2, s] mask): sequence 1 sees sequence 0's first 5 tokens, sequence 5
    # sees sequence 4's only token; against SDPA with the equivalent explicit bool mask, and the
    # varlen path (which cannot express it) must fall back to the per-segment one
    shared = torch.zeros_like(seg)
    shared[0, 17:39], shared[2, 6:39] = 5, 1
    allowed = ~block_causal_mask(seg)
    allowed[0, 0, 17:39, 0:5] = True
    allowed[2, 0, 6:39, 5:6] = True
    ref_out = core(q, k, v, ~allowed)

    def no_varlen(*args, **kwargs):
        raise AssertionError("a shared prefix took the varlen path")

    attention._varlen_attn, saved = no_varlen, attention._varlen_attn
    type(core)._use_varlen, saved_use = staticmethod(lambda query, dropout: True), \
        type(core)._use_varlen
    try:
        shared_out = core(q, k, v, torch.stack([seg, shared], 1))
    finally:
        attention._varlen_attn, type(core)._use_varlen = saved, saved_use
    result["shared_prefix"] = _rel(shared_out, ref_out)
    result["shared_changes_output"] = _rel(shared_out, per_segment) > 1e-3
    return result


def test_sdpa_attention_equals_megatron_unfused():
    r = run_distributed(_case, nproc=1)[0]
    assert r["core"] == "PackedSDPAttention" and r["gqa"], r
    # ours rotates q/k from one cos/sin table per forward; the reference is Megatron's own RoPE
    assert r["attention"] == "RotaryOnceSelfAttention" and r["ref_attention"] == "SelfAttention"
    for name in ("packed", "causal", "bool_mask", "packed_recompute"):
        assert r[name]["logits"] < 1e-5 and r[name]["grads"] < 1e-4, (name, r[name])
    assert r["packed_vs_alone"] < 1e-5, r
    assert r["trimmed_vs_full"] < 1e-5 and r["trimmed_width"] < S, r
    assert r["varlen_layout"] < 1e-6 and r["varlen_shape"], r
    assert r["shared_prefix"] < 1e-5 and r["shared_changes_output"], r


def test_cu_seqlens_split_bins_and_padding():
    cu, longest = cu_seqlens(_segments())
    assert cu.tolist() == [0, 17, 39, 48, 96, 101, 102, 135, 144] and longest == 48
