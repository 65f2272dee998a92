"""Validation during training (data.valid, train.eval_interval): the validation metrics are the
training step's metrics over the same pairs (checked with lr=0 on a validation set equal to the
training set, one global batch holding every bin), logged as eval/... at the right iterations,
with per-split reference log-prob stores; the microbatch padding rows change nothing, and under
interleaved pipelining a call with fewer microbatches than stages gives the PP=1 result."""

import json

import numpy as np
import pytest

from avr_megatron.testing.distributed import run_distributed
from avr_megatron.training.evaluation import rank_microbatches, validation_bins

COMMON = ["model.preset=tiny", "train.seq_length=128", "logging.progress_bar=false",
          "logging.tensorboard=false", "checkpoint.save_final=false"]


def test_validation_bins_are_dealt_evenly():
    bins = validation_bins(11, 4, None)
    assert bins.tolist() == list(range(11)) and len(validation_bins(11, 4, 2)) == 8
    parts = [rank_microbatches(bins, r, 2, 2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 3]  # same count on every rank
    flat = np.concatenate([np.concatenate(p) for p in parts])
    assert sorted(flat[flat >= 0].tolist()) == list(range(11)) and (flat < 0).sum() == 1
    assert [len(p) for p in rank_microbatches(np.arange(1), 0, 4, 2)] == [2]


def _case(tmp):
    from pathlib import Path

    from avr_megatron.config import load_config
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import preference_records, sft_records, write_jsonl
    from avr_megatron.training.runs import run_dpo, run_logps, run_sft

    tmp = Path(tmp)
    tok = train_tiny_tokenizer(tmp / "tok")
    pairs = write_jsonl(preference_records(14, seed=3), tmp / "pairs.jsonl")
    valid = write_jsonl(preference_records(14, seed=3), tmp / "valid" / "pairs.jsonl")
    odd = write_jsonl(preference_records(13, seed=7), tmp / "odd.jsonl")
    sft = write_jsonl(sft_records(40, seed=4), tmp / "sft.jsonl")
    sft_valid = write_jsonl(sft_records(9, seed=5), tmp / "sft_valid.jsonl")
    common = COMMON + [f"data.tokenizer={tok}", "optimizer.lr=1e-15", "optimizer.min_lr=0",
                       "loss.beta=0.5", "data.pack=false"]
    out = {}
    # SFT with eval every 2 steps of 5 (and after the last); its checkpoints give DPO a policy
    # (iteration 5) that differs from its reference (iteration 1).
    sft_cfg = load_config(None, COMMON + [
        f"data.tokenizer={tok}", f"data.train={sft}", f"data.valid={sft_valid}",
        "train.train_iters=5", "train.eval_interval=2", "train.micro_batch_size=2",
        "train.global_batch_size=4", f"run.dir={tmp / 'sft'}", "optimizer.lr=1e-2",
        "checkpoint.save_interval=1", "checkpoint.keep_last=0"])
    run_sft(sft_cfg, progress=False)
    out["sft_rows"] = [json.loads(x) for x in
                       (tmp / "sft" / "metrics.jsonl").read_text().splitlines()]
    ckpt = tmp / "sft" / "checkpoints"
    common += [f"model.init_from.mcore={ckpt / 'iter_0000005'}",
               f"logps.reference.mcore={ckpt / 'iter_0000001'}"]
    # DPO, (almost) lr=0, train = valid, one global batch = every bin (one pair per bin).
    base = common + [f"data.train={pairs}", f"data.valid={valid}", "train.micro_batch_size=2",
                     "train.global_batch_size=14", "train.train_iters=2", f"run.dir={tmp / 'dpo'}"]
    stores = run_logps(load_config(None, base), progress=False)
    out["stores"] = [str(p) for p, _ in stores]
    result = run_dpo(load_config(None, base + ["train.eval_interval=1", "checkpoint.save_final=true",
                                               f"checkpoint.export_hf={tmp / 'hf'}"]),
                     progress=False)
    out["card"] = (tmp / "hf" / "README.md").read_text()
    out["exported"] = sorted(p.name for p in (tmp / "hf").iterdir())
    out["dpo_rows"] = [json.loads(x) for x in
                       (tmp / "dpo" / "metrics.jsonl").read_text().splitlines()]
    out["dpo_summary_eval"] = result.summary["eval"]
    # 13 validation pairs in microbatches of 2 (one empty padding row) or of 1.
    out["odd"] = []
    for mbs in (2, 1):
        cfg = load_config(None, common + [
            f"data.train={pairs}", f"data.valid={odd}", f"train.micro_batch_size={mbs}",
            "train.global_batch_size=2", "train.train_iters=1", f"run.dir={tmp / f'odd{mbs}'}"])
        run_logps(cfg, progress=False)
        out["odd"].append(run_dpo(cfg, progress=False).summary["eval"])
    return out


@pytest.mark.slow
def test_validation_matches_training_metrics_and_is_logged(tmp_path):
    r = run_distributed(_case, nproc=1, tmp=str(tmp_path))[0]
    assert r["stores"] == [str(tmp_path / "pairs.jsonl.ref_logps"),
                           str(tmp_path / "valid" / "pairs.jsonl.ref_logps")]
    first = r["dpo_rows"][0]
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen")
    assert 0 < first["rewards/accuracies"] < 1 and first["rewards/margins"] != 0
    for k in keys:
        assert first[f"eval/{k}"] == pytest.approx(first[k], rel=1e-6, abs=1e-9), k
    padded, plain = r["odd"]
    for k in keys:
        assert padded[f"eval/{k}"] == pytest.approx(plain[f"eval/{k}"], rel=1e-6, abs=1e-9), k
    assert [("eval/loss" in row) for row in r["dpo_rows"]] == [True, True]
    assert r["dpo_summary_eval"]["eval/loss"] == r["dpo_rows"][-1]["eval/loss"]
    card, fp = r["card"], r["dpo_summary_eval"]
    assert "README.md" in r["exported"] and "model.safetensors" in r["exported"]
    assert "```yaml" in card and "reward_gap_weight_max" in card  # the resolved recipe
    assert "preference optimisation" in card and "iteration 2 of 2" in card
    assert "iter_0000005" in card and "reference model" in card and "iter_0000001" in card
    assert str(tmp_path / "valid" / "pairs.jsonl") in card and "14 examples" in card
    assert f"| eval/loss | {fp['eval/loss']:.6g} |" in card
    assert "| loss | sigmoid, beta 0.5" in card
    sft = r["sft_rows"]
    assert [row["iteration"] for row in sft if "eval/loss" in row] == [2, 4, 5]
    assert sft[-1]["eval/loss"] < sft[1]["eval/loss"]  # learning shows on held-out data


def _interleaved_case(tmp):
    from pathlib import Path

    from avr_megatron.config import load_config
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.testing.distributed import save_initial_weights
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import sft_records, write_jsonl
    from avr_megatron.training.runs import run_sft

    tmp = Path(tmp)
    base = COMMON + ["model.num_layers=4", "data.pack=false", "data.overlong=truncate",
                     f"data.tokenizer={tmp / 'tok'}", f"data.train={tmp / 'sft.jsonl'}",
                     f"data.valid={tmp / 'valid.jsonl'}", "train.micro_batch_size=1",
                     "train.global_batch_size=2", "train.train_iters=1", "optimizer.lr=1e-15",
                     "optimizer.min_lr=0"]
    if is_rank0():
        train_tiny_tokenizer(tmp / "tok")
        write_jsonl(sft_records(8, seed=4), tmp / "sft.jsonl")
        write_jsonl(sft_records(3, seed=5), tmp / "valid.jsonl")
    base += [save_initial_weights(base, tmp / "init")]
    out = {}
    # PP=1 (DP=2), then PP=2 x VPP=2 (DP=1): 3 validation bins in calls of 2 microbatches,
    # the last call of 1 (fewer than PP: padded for Megatron's interleaved schedule).
    for name, extra in (("pp1", []), ("vpp", ["parallel.pipeline_model_parallel_size=2",
                                               "parallel.virtual_pipeline_model_parallel_size=2"])):
        out[name] = run_sft(load_config(None, base + extra + [f"run.dir={tmp / name}"]),
                            progress=False).summary["eval"]
    return out


@pytest.mark.slow
def test_interleaved_validation_with_a_short_last_call_equals_pp1(tmp_path):
    r = run_distributed(_interleaved_case, nproc=2, timeout=300, tmp=str(tmp_path))[0]
    assert r["vpp"]["eval/loss"] == pytest.approx(r["pp1"]["eval/loss"], rel=1e-5)
