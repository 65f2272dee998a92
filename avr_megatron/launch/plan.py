"""What a recipe will do on a job of a given size, without importing torch: the parallel layout
(TP x PP x CP x DP for the world size, with the same divisibility check training makes), where
it reads and writes, and the batch shape. The sbatch scripts (slurm/lib/avr_job.sh) print it in
their dry run and read run.dir from it before starting the processes.

    python -m avr_megatron.launch.plan --recipe recipes/llama3_70b.yaml --world-size 64 [k=v ...]

Exit code 2 with a message naming the keys when the recipe is invalid, the world size does not
fit its layout, or a value the command reads is still a placeholder (`/path/to/...`,
`YOUR_...`; with --dryrun they are warnings).
"""

from __future__ import annotations

import argparse
import os
import sys

from avr_megatron.config import AvrConfig, ConfigError, load_config
from avr_megatron.config.layout import layout_for, microbatches_per_step
from avr_megatron.config.placeholders import (SECTIONS_OF_COMMAND, find_placeholders,
                                              placeholder_message)


def describe(cfg: AvrConfig, world_size: int) -> str:
    p, t = cfg.parallel, cfg.train
    layout = layout_for(cfg, world_size)
    ckpt = cfg.checkpoint.dir or os.path.join(cfg.run.dir, "checkpoints")
    lines = [
        f"run.dir: {os.path.abspath(cfg.run.dir)}",
        f"checkpoint.dir: {os.path.abspath(ckpt)}",
        f"model: preset={cfg.model.preset} layers={cfg.model.num_layers} "
        f"hidden={cfg.model.hidden_size}",
        f"layout: world={world_size} TP={layout.tp} PP={layout.pp} VPP={layout.vpp}"
        f" CP={layout.cp} DP={layout.dp} sequence_parallel={p.sequence_parallel}",
        f"batch: global={t.global_batch_size} micro={t.micro_batch_size} "
        f"seq_length={t.seq_length} train_iters={t.train_iters}",
    ]
    microbatches_per_step(cfg, layout.dp)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m avr_megatron.launch.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", "-r", required=True)
    ap.add_argument("--world-size", type=int, required=True,
                    help="processes in the job (nodes x tasks per node)")
    ap.add_argument("--command", default="train",
                    help="the avr command the job runs (its first word picks the recipe sections "
                         "checked for placeholders)")
    ap.add_argument("--dryrun", action="store_true",
                    help="placeholders are warnings (the plan is still printed), not errors")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        found = find_placeholders(cfg, SECTIONS_OF_COMMAND.get(args.command.split()[0]))
        if found and not args.dryrun:
            raise ConfigError(placeholder_message(found))
        for item in found:
            print(f"WARNING: placeholder {item}: edit it before submitting", file=sys.stderr)
        print(describe(cfg, args.world_size))
    except ConfigError as e:
        print(f"avr plan: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
