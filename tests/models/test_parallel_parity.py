"""TP=2 / PP=2 against TP=1 / PP=1 with the same weights: logits, loss and gradients.

Each check runs in one `torchrun --nproc-per-node 2` launch: the reference layout is built first
(two data-parallel replicas), then the process groups are rebuilt for the parallel layout and
the same full weights are loaded into its shards.
"""

import pytest
import torch

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _batch(vocab, b=2, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, s + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _position_ids(tokens):
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()


def _full_logits(chunks, tokens):
    """Forward on one stage (PP=1), vocab-parallel logits gathered over TP."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    logits = chunks[0](tokens, _position_ids(tokens), None)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def _loss(logits, labels, vocab):
    return torch.nn.functional.cross_entropy(logits[..., :vocab].reshape(-1, vocab),
                                             labels.reshape(-1))


def _tp_case(overrides):
    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime.distributed import initialize

    results = {}
    ref_cfg = load_config(None, ["model.preset=tiny", *overrides])
    vocab, tied = ref_cfg.model.vocab_size, ref_cfg.model.tie_word_embeddings
    tokens, labels = _batch(vocab)
    initialize(ref_cfg)
    ref = build_model(ref_cfg)
    weights = gather_full(ref, tied)
    ref_logits = _full_logits(ref, tokens)
    ref_loss = _loss(ref_logits, labels, vocab)
    ref_loss.backward()
    ref_grads = gather_full(ref, tied, value=lambda p: p.grad)

    cfg = load_config(None, ["model.preset=tiny", "parallel.tensor_model_parallel_size=2",
                             *overrides])
    initialize(cfg)
    model = build_model(cfg)
    load_full_state_dict(model, weights, tied)
    logits = _full_logits(model, tokens)
    loss = _loss(logits, labels, vocab)
    loss.backward()
    grads = gather_full(model, tied, value=lambda p: p.grad)

    results["logits"] = (logits - ref_logits).abs().max().item()
    results["loss"] = abs(loss.item() - ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    results["grads"] = max(((grads[k] - ref_grads[k]).abs().max() /
                            ref_grads[k].abs().max().clamp_min(1e-12)).item() for k in grads)
    return results


@pytest.mark.parametrize("overrides", [[], ["model.tie_word_embeddings=true"]],
                         ids=["untied", "tied"])
def test_tp2_matches_tp1(overrides):
    for r in run_distributed(_tp_case, nproc=2, overrides=overrides):
        assert r["logits"] < 1e-5, r
        assert r["loss"] < 1e-6, r
        assert r["grads"] < 1e-5, r


def _pp_case(vpp):
    """1F1B (or interleaved 1F1B with vpp) through Megatron's forward-backward function."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime.distributed import initialize

    layers = 4
    base = ["model.preset=tiny", f"model.num_layers={layers}"]
    num_mb, mbs, seq = 4, 2, 16

    def run(cfg, weights):
        initialize(cfg)
        chunks = build_model(cfg)
        if weights is not None:
            load_full_state_dict(chunks, weights, False)
        vocab = cfg.model.vocab_size
        batches = [_batch(vocab, mbs, seq, seed=i) for i in range(num_mb)]

        def loss_func(labels, logits):
            loss = _loss(logits, labels, vocab)
            return loss * labels.numel(), torch.tensor(labels.numel()), {"loss": loss.detach()}

        def forward_step(data_iterator, model):
            tokens, labels = next(data_iterator)
            return model(tokens, _position_ids(tokens), None), partial(loss_func, labels)

        iters = [iter(batches) for _ in chunks]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks, num_microbatches=num_mb, seq_length=seq, micro_batch_size=mbs,
            forward_only=False)
        return chunks, [x["loss"].item() for x in losses]  # per microbatch, in order

    ref, ref_loss = run(load_config(None, base), None)
    weights = gather_full(ref, False)
    ref_grads = gather_full(ref, False, value=lambda p: p.grad)
    pp = ["parallel.pipeline_model_parallel_size=2"]
    if vpp:
        pp.append(f"parallel.virtual_pipeline_model_parallel_size={vpp}")
    chunks, loss = run(load_config(None, base + pp), weights)
    grads = gather_full(chunks, False, value=lambda p: p.grad)
    from megatron.core import parallel_state

    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    assert grads.keys() == ref_grads.keys()
    return {"last_stage": last, "loss": max(abs(a - b) for a, b in zip(loss, ref_loss, strict=True)) if last else None,
            "grads": max(((grads[k] - ref_grads[k]).abs().max() /
                          ref_grads[k].abs().max().clamp_min(1e-12)).item() for k in grads)}


@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_pp2_matches_pp1(vpp):
    results = run_distributed(_pp_case, nproc=2, vpp=vpp)
    assert sum(r["last_stage"] for r in results) == 1
    for r in results:
        if r["last_stage"]:
            assert r["loss"] < 1e-6, r
        assert r["grads"] < 1e-5, r
