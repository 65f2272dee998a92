"""`avr smoke`: a short Megatron training run on synthetic data (see training/smoke.py)."""

from __future__ import annotations


def run(args, cfg) -> int:
    from avr_megatron.runtime.distributed import is_rank0, shutdown
    from avr_megatron.training.smoke import run_smoke

    summary = run_smoke(cfg).summary
    if is_rank0():
        layout = summary["layout"]
        print(f"smoke: TP={layout['tp']} PP={layout['pp']} DP={layout['dp']}  "
              f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} over "
              f"{summary['iters']} steps, {summary['tokens_per_second']:.0f} tokens/s; "
              f"summary in {cfg.run.dir}/smoke_summary.json")
    shutdown()
    return 0
