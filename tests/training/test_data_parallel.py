"""DP=2 with Megatron DDP and the distributed optimizer: loss falls, replicas stay identical."""

import pytest

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _dp_case(run_dir, overrides):
    import torch
    import torch.distributed as dist

    from avr_megatron.config import load_config
    from avr_megatron.testing.state import gather_full
    from avr_megatron.training.smoke import run_smoke

    cfg = load_config(None, ["model.preset=tiny", f"run.dir={run_dir}", "train.train_iters=30",
                             "train.seq_length=32", "train.micro_batch_size=2",
                             "train.global_batch_size=8", "optimizer.lr=1e-2",
                             "scheduler.warmup_iters=3", *overrides])
    run = run_smoke(cfg, progress=False)
    summary, chunks = run.summary, run.chunks
    from megatron.core import parallel_state

    sums = torch.stack([p.detach().double().sum() for p in chunks[0].parameters()])
    gathered = [torch.zeros_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    return {"first": summary["first_loss"], "last": summary["last_loss"],
            "replicas_equal": all(torch.equal(gathered[0], g) for g in gathered),
            "dp": parallel_state.get_data_parallel_world_size()}


@pytest.mark.parametrize("overrides", [["optimizer.use_distributed_optimizer=true"],
                                       ["optimizer.use_distributed_optimizer=false"]],
                         ids=["distributed-optimizer", "plain-optimizer"])
def test_dp2_trains_and_replicas_agree(tmp_path, overrides):
    results = run_distributed(_dp_case, nproc=2, run_dir=str(tmp_path), overrides=overrides)
    for r in results:
        assert r["dp"] == 2
        assert r["last"] < 0.5 * r["first"], r
        assert r["replicas_equal"], r


def _dpo_mixed_gaps_case(tmp):
    import json
    from pathlib import Path

    from avr_megatron.config import load_config
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import preference_records, write_jsonl
    from avr_megatron.training.runs import run_dpo

    tmp = Path(tmp)
    records = preference_records(24, seed=3)
    for r in records[::2]:  # half the pairs carry no reward gap
        for key in ("reward_gap", "reward_chosen", "reward_rejected"):
            r.pop(key)
    if is_rank0():
        train_tiny_tokenizer(tmp / "tok")
        write_jsonl(records, tmp / "pairs.jsonl")
    import torch.distributed as dist

    from avr_megatron.runtime.distributed import initialize

    initialize(load_config(None, ["model.preset=tiny"]))
    dist.barrier()  # the data exists before any rank reads it
    cfg = load_config(None, [
        "model.preset=tiny", f"run.dir={tmp / 'run'}", f"data.tokenizer={tmp / 'tok'}",
        f"data.train={tmp / 'pairs.jsonl'}", "data.pack=false", "data.overlong=truncate",
        "train.seq_length=128", "train.micro_batch_size=1", "train.global_batch_size=8",
        "train.train_iters=3", "loss.reference=online", "logging.progress_bar=false",
        "logging.tensorboard=false", "checkpoint.save_final=false", "checkpoint.resume=false"])
    result = run_dpo(cfg, progress=False)
    rows = ([json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
            if is_rank0() else None)
    return {"status": result.status, "rows": rows}


def test_dp2_dpo_with_reward_gaps_on_some_pairs_only(tmp_path):
    """Every rank reports `reward_gap` (the mean over pairs that have one), so the metric
    all-reduce sees the same names on both data-parallel ranks."""
    import math

    results = run_distributed(_dpo_mixed_gaps_case, nproc=2, timeout=300, tmp=str(tmp_path))
    assert all(r["status"] == "finished" for r in results)
    rows = results[0]["rows"]
    assert len(rows) == 3 and all("reward_gap" in row for row in rows)
    assert any(math.isfinite(row["reward_gap"]) for row in rows), rows


def _overlap_case(tmp, overrides):
    """SFT with overlapped gradient reduction and parameter all-gather against the same run
    without: same losses; the checkpoints (fully parallel save) hold the final weights (the
    lazily gathered parameters are synced before a save) and load back (fully parallel load)."""
    import json
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint
    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.testing.state import gather_full
    from avr_megatron.runtime.distributed import is_rank0
    from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
    from avr_megatron.testing.toy_data import sft_records, write_jsonl
    from avr_megatron.training.runs import run_sft

    tmp = Path(tmp)
    from avr_megatron.runtime.distributed import initialize

    if is_rank0():
        train_tiny_tokenizer(tmp / "tok")
        write_jsonl(sft_records(40, seed=4), tmp / "sft.jsonl")
    initialize(load_config(None, ["model.preset=tiny"]))
    dist.barrier()  # the data exists before any rank reads it
    base = ["model.preset=tiny", "model.num_layers=4", f"data.tokenizer={tmp / 'tok'}",
            f"data.train={tmp / 'sft.jsonl'}", "data.overlong=truncate", "train.seq_length=64",
            "train.micro_batch_size=1", "train.global_batch_size=8", "train.train_iters=3",
            "optimizer.lr=1e-2", "scheduler.warmup_iters=0", "logging.progress_bar=false",
            "logging.tensorboard=false", "checkpoint.resume=false", *overrides]
    out = {}
    for name, on in (("off", "false"), ("on", "true")):
        cfg = load_config(None, base + [f"run.dir={tmp / name}", f"ddp.overlap_grad_reduce={on}",
                                        f"ddp.overlap_param_gather={on}"])
        result = run_sft(cfg, progress=False)
        final = gather_full(result.chunks, False)
        fresh = build_model(cfg)
        load_checkpoint(tmp / name / "checkpoints", fresh, fully_parallel=True)
        saved = gather_full(fresh, False)
        losses = ([json.loads(line)["loss"] for line in
                   (tmp / name / "metrics.jsonl").read_text().splitlines()] if is_rank0() else None)
        out[name] = {"losses": losses, "weights": final,
                     "saved_is_final": all(torch.equal(saved[k], final[k]) for k in final)}
    return {"losses": (out["off"]["losses"], out["on"]["losses"]),
            "weights_diff": max((out["off"]["weights"][k] - out["on"]["weights"][k]).abs().max()
                                .item() for k in out["off"]["weights"]),
            "saved_is_final": (out["off"]["saved_is_final"], out["on"]["saved_is_final"])}


@pytest.mark.parametrize("nproc,overrides", [
    (2, []),
    (4, ["parallel.pipeline_model_parallel_size=2",
         "parallel.virtual_pipeline_model_parallel_size=2"]),
], ids=["dp2", "pp2-vpp2-dp2"])
def test_overlapped_communication_and_fully_parallel_checkpoints(tmp_path, nproc, overrides):
    results = run_distributed(_overlap_case, nproc=nproc, timeout=600, tmp=str(tmp_path),
                              overrides=overrides)
    off, on = results[0]["losses"]
    assert len(off) == 3 and off == on, (off, on)
    for r in results:
        assert r["weights_diff"] == 0.0, r["weights_diff"]
        assert r["saved_is_final"] == (True, True), r["saved_is_final"]
