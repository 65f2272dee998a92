"""Parallel layouts change nothing but the summation order.

One 2-rank launch checks (a) the DPO step function's loss and gradients, and the online
reference's log-probs, under TP=2, PP=2 (1F1B) and PP=2 x VPP=2 against TP=1/PP=1 with the same
weights; (b) whole training runs: `avr logps` under TP=2, then DPO with those stored reference
log-probs under DP=2, TP=2 and PP=2 and with online reference log-probs under DP=2 give the same
loss curve, and SFT under DP=2 and TP=2 too (per-token normalisation over the global batch).
"""

import pytest
import torch

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

BASE = ["model.preset=tiny", "model.num_layers=4", "train.seq_length=128",
        "train.micro_batch_size=1", "train.global_batch_size=4", "optimizer.lr=2e-3",
        "scheduler.warmup_iters=0", "data.overlong=truncate", "logging.progress_bar=false",
        "logging.tensorboard=false", "checkpoint.save_final=false", "checkpoint.resume=false"]
LAYOUTS = {"tp2": ["parallel.tensor_model_parallel_size=2"],
           "pp2": ["parallel.pipeline_model_parallel_size=2"],
           "vpp2": ["parallel.pipeline_model_parallel_size=2",
                    "parallel.virtual_pipeline_model_parallel_size=2"]}


def _step_parity(cfg_base):
    """Loss/grad parity of the DPO step function through Megatron's schedules (no DDP)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from avr_megatron.config import load_config
    from avr_megatron.data.batches import collate
    from avr_megatron.data.dataset import load_training_data
    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import gather_full, load_full_state_dict
    from avr_megatron.runtime.distributed import initialize
    from avr_megatron.training.losses.common import SequenceLogprobs
    from avr_megatron.training.losses.preference import PreferenceObjective
    from avr_megatron.training.reference import OnlineReference

    def run(overrides, weights, ref_weights):
        cfg = load_config(None, cfg_base + overrides + ["loss.sft_weight=0.5",
                                                        "loss.reward_gap=margin"])
        td = load_training_data(cfg, "preference")
        initialize(cfg)
        chunks, ref_chunks = build_model(cfg), build_model(cfg)
        if weights is None:
            weights = gather_full(chunks, False)
            ref_weights = {k: v * 1.02 + 0.01 for k, v in weights.items()}
        load_full_state_dict(chunks, weights, False)
        load_full_state_dict(ref_chunks, ref_weights, False)
        vocab = cfg.model.vocab_size
        reference = OnlineReference(ref_chunks, SequenceLogprobs(vocab, 16).sequences,
                                    use_te=False, bf16=False, seq_length=128,
                                    bins_per_microbatch=2)
        objective = PreferenceObjective(cfg.loss, vocab_size=vocab, use_te=False, bf16=False,
                                        reference=reference)
        batches = [collate(td.data, td.plan, [2 * i, 2 * i + 1], td.chat.pad_id)
                   for i in range(4)]
        objective.prepare(batches)
        iters = [iter(batches) for _ in chunks]
        out = get_forward_backward_func()(
            forward_step_func=objective.forward_step,
            data_iterator=iters if len(chunks) > 1 else iters[0], model=chunks,
            num_microbatches=4, seq_length=128, micro_batch_size=2, forward_only=False)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        losses = [o["loss"][0].item() for o in out] if last else None
        refs = [torch.cat([b.ref_chosen, b.ref_rejected]) for b in batches] if last else None
        grads = gather_full(chunks, False, value=lambda p: p.grad)
        return losses, refs, grads, weights, ref_weights

    ref_losses, ref_refs, ref_grads, weights, ref_weights = run([], None, None)
    result = {}
    for name, overrides in LAYOUTS.items():
        losses, refs, grads, _, _ = run(overrides, weights, ref_weights)
        assert grads.keys() == ref_grads.keys()
        result[name] = {
            "loss": None if losses is None else max(abs(a - b) / abs(b) for a, b in
                                                    zip(losses, ref_losses, strict=True)),
            "ref_logps": None if refs is None else max((a - b).abs().max().item()
                                                       for a, b in zip(refs, ref_refs)),
            "grads": max(((grads[k] - ref_grads[k]).abs().max()
                          / ref_grads[k].abs().max().clamp_min(1e-12)).item() for k in grads)}
    return result


def _curves(tmp):
    """Whole runs under several layouts: same loss curves."""
    import json
    from pathlib import Path

    from avr_megatron.config import load_config
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.testing.distributed import save_initial_weights
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import preference_records, sft_records, write_jsonl
    from avr_megatron.training.runs import run_dpo, run_logps, run_sft

    tmp = Path(tmp)
    if is_rank0():
        train_tiny_tokenizer(tmp / "tok")
        write_jsonl(preference_records(40, seed=5), tmp / "pairs.jsonl")
        write_jsonl(sft_records(40, seed=6), tmp / "sft.jsonl")
    data_kw = [f"data.tokenizer={tmp / 'tok'}"]
    # Initial weights: one checkpoint saved at TP=1, resharded by every layout that loads it.
    base = BASE + data_kw + [save_initial_weights(BASE + data_kw, tmp / "init")]

    step = _step_parity(BASE + data_kw + [f"data.train={tmp / 'pairs.jsonl'}"])

    def train(fn, name, extra):
        cfg = load_config(None, base + [f"run.dir={tmp / name}", "train.train_iters=4", *extra])
        fn(cfg, progress=False)
        if not is_rank0():  # rank 0 writes the metrics
            return None
        lines = (tmp / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    pairs = [f"data.train={tmp / 'pairs.jsonl'}", f"logps.path={tmp / 'ref_logps'}"]
    run_logps(load_config(None, base + pairs + LAYOUTS["tp2"]), progress=False)
    curves = {"dpo_dp2": train(run_dpo, "dpo_dp2", pairs),
              "dpo_dp2_online": train(run_dpo, "dpo_dp2_online", pairs + ["loss.reference=online"]),
              "dpo_tp2": train(run_dpo, "dpo_tp2", pairs + LAYOUTS["tp2"]),
              "dpo_pp2": train(run_dpo, "dpo_pp2", pairs + LAYOUTS["pp2"])}
    sft = [f"data.train={tmp / 'sft.jsonl'}"]
    curves["sft_dp2"] = train(run_sft, "sft_dp2", sft)
    curves["sft_tp2"] = train(run_sft, "sft_tp2", sft + LAYOUTS["tp2"])
    stamp = json.loads((tmp / "ref_logps" / "stamp.json").read_text())
    return {"step": step, "curves": curves, "stamp_layout": stamp["layout"]}


def test_layouts_agree(tmp_path):
    results = run_distributed(_curves, nproc=2, tmp=str(tmp_path))
    for r in results:
        for name, v in r["step"].items():
            if v["loss"] is not None:
                assert v["loss"] < 1e-5, (name, v)
                assert v["ref_logps"] < 1e-4, (name, v)
            assert v["grads"] < 1e-4, (name, v)
    assert sum(r["step"]["pp2"]["loss"] is not None for r in results) == 1
    c = results[0]["curves"]
    assert results[0]["stamp_layout"] == {"tp": 2, "pp": 1, "dp": 1}
    ref = c["dpo_dp2"]
    assert len(ref) == 4 and ref[-1] < ref[0]
    for name in ("dpo_dp2_online", "dpo_tp2", "dpo_pp2"):
        assert max(abs(a - b) for a, b in zip(c[name], ref, strict=True)) < 1e-4, (name, c)
    assert max(abs(a - b) for a, b in zip(c["sft_tp2"], c["sft_dp2"], strict=True)) < 1e-4, c
    assert c["sft_dp2"][-1] < c["sft_dp2"][0]
