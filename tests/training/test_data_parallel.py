"""DP=2 with Megatron DDP and the distributed optimizer: loss falls, replicas stay identical."""

import pytest

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _dp_case(run_dir, overrides):
    import torch
    import torch.distributed as dist

    from avr_megatron.config import load_config
    from avr_megatron.models.state import gather_full
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
