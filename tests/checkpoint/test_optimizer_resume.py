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


def _early_save_case(root):
    """Save before any optimizer step (Megatron's distributed optimizer raised a bare
    AssertionError), then check the saved and the saving optimizer step like a fresh one."""
    import torch

    from avr_megatron.checkpoint.dist_ckpt import load_checkpoint, read_meta, save_checkpoint
    from avr_megatron.config import load_config
    from avr_megatron.models.llama import build_model
    from avr_megatron.runtime.distributed import initialize, seed_everything
    from avr_megatron.training.setup import build_optimizer, wrap_ddp

    cfg = load_config(None, ["model.preset=tiny", "optimizer.use_distributed_optimizer=true",
                             "optimizer.weight_decay=0.1", f"run.dir={root}/run"])
    initialize(cfg)

    def build():
        seed_everything(cfg.run.seed)
        chunks = wrap_ddp(build_model(cfg), cfg)
        return chunks, build_optimizer(chunks, cfg)

    saver, fresh, loaded = build(), build(), build()
    save_checkpoint(f"{root}/ck", 0, saver[0], cfg, optimizer=saver[1])
    load_checkpoint(f"{root}/ck", loaded[0], optimizer=loaded[1])
    params = []
    for chunks, opt in (saver, fresh, loaded):
        g = torch.Generator().manual_seed(0)
        for _ in range(2):  # two steps: the step count and both moments matter
            for p in chunks[0].parameters():
                p.main_grad.copy_(torch.randn(p.shape, generator=g))
            opt.step()
        params.append([p.detach().clone() for p in chunks[0].parameters()])
    return {"optimizer_steps": read_meta(f"{root}/ck")["optimizer_steps"],
            "saver_equals_fresh": all(torch.equal(a, b) for a, b in zip(params[0], params[1])),
            "loaded_equals_fresh": all(torch.equal(a, b) for a, b in zip(params[2], params[1])),
            "moved": any(not torch.equal(a, b) for a, b in
                         zip(params[1], [p.detach() for p in build()[0][0].parameters()]))}


def test_save_before_the_first_optimizer_step(tmp_path):
    (r,) = run_distributed(_early_save_case, nproc=1, root=str(tmp_path))
    assert r == {"optimizer_steps": [0.0], "saver_equals_fresh": True, "loaded_equals_fresh": True,
                 "moved": True}, r
