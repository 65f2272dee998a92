"""Loading a checkpoint into a fresh (never stepped) optimizer restores the Adam moments and the
step count, one step tensor per parameter, for the distributed and the plain optimizer."""

import pytest

from avr_megatron.testing.distributed import run_distributed

pytestmark = pytest.mark.slow


def _case(root):
    import torch

    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.training.setup import build_optimizer, build_scheduler, wrap_ddp
    from avr_megatron.training.smoke import run_smoke

    def inner(opt):
        return opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") \
            else opt.optimizer

    out = {}
    for dist_opt in (True, False):
        cfg = load_config(None, ["model.preset=tiny", "train.train_iters=3", "train.seq_length=16",
                                 "train.global_batch_size=4", "train.micro_batch_size=2",
                                 f"optimizer.use_distributed_optimizer={dist_opt}",
                                 f"run.dir={root}/run{dist_opt}"])
        run = run_smoke(cfg, progress=False)
        save_checkpoint(f"{root}/ck{dist_opt}", 3, run.chunks, cfg, optimizer=run.optimizer,
                        scheduler=run.scheduler)
        before = [{k: v.clone() for k, v in st.items()}
                  for st in inner(run.optimizer).state.values()]
        chunks = wrap_ddp(build_model(cfg), cfg)
        opt = build_optimizer(chunks, cfg)
        sched = build_scheduler(opt, cfg)
        load_checkpoint(f"{root}/ck{dist_opt}", chunks, optimizer=opt, scheduler=sched)
        after = list(inner(opt).state.values())
        out[dist_opt] = {
            "same_state": len(before) == len(after) > 0 and all(
                torch.equal(a[k], b[k]) for a, b in zip(before, after) for k in a),
            "steps": sorted({float(st["step"]) for st in after}),
            "distinct_step_tensors": len({id(st["step"]) for st in after}) == len(after),
            "weights": all(torch.equal(a, b) for a, b in zip(run.chunks[0].parameters(),
                                                             chunks[0].parameters()))}
    return out


def test_fresh_optimizer_resume(tmp_path):
    for r in run_distributed(_case, nproc=2, root=str(tmp_path)):
        for dist_opt, v in r.items():
            assert v == {"same_state": True, "steps": [3.0], "distinct_step_tensors": True,
                         "weights": True}, (dist_opt, v)
