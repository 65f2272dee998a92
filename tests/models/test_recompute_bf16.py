"""Activation recompute changes memory, not results; bf16 (Float16Module) tracks fp32."""

import pytest
import torch

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _case():
    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime.distributed import initialize

    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).unsqueeze(0).expand_as(tokens)
    out, weights = {}, None
    variants = {
        "none": [],
        "full": ["model.recompute_granularity=full", "model.recompute_method=uniform",
                 "model.recompute_num_layers=1"],
        "selective": ["model.recompute_granularity=selective"],
        "bf16": ["precision.bf16=true"],
    }
    for name, extra in variants.items():
        cfg = load_config(None, ["model.preset=tiny", *extra])
        initialize(cfg)
        chunks = build_model(cfg)
        if weights is None:
            weights = gather_full(chunks, False)
        else:
            load_full_state_dict(chunks, weights, False)
        logits = chunks[0](tokens, positions, None)
        logits.float().square().mean().backward()
        grad = (lambda p: p.main_grad if hasattr(p, "main_grad") else p.grad)
        out[name] = (logits.detach().float(), gather_full(chunks, False, value=grad))
    ref_logits, ref_grads = out["none"]
    result = {}
    for name in ("full", "selective", "bf16"):
        logits, grads = out[name]
        result[name] = {
            "logits": (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item(),
            "grads": max(((grads[k] - ref_grads[k]).abs().max()
                          / ref_grads[k].abs().max()).item() for k in ref_grads),
            "dtype_ok": True}
    return result


def test_recompute_exact_and_bf16_close():
    r = run_distributed(_case, nproc=1)[0]
    for name in ("full", "selective"):
        assert r[name]["logits"] < 1e-6 and r[name]["grads"] < 1e-5, (name, r[name])
    assert r["bf16"]["logits"] < 5e-2, r["bf16"]
