"""Handler of `avr pipeline`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    parser.add_argument("--to", dest="stop", metavar="STAGE", help="stop after this stage")
    parser.add_argument("--only", metavar="STAGE", help="run just this stage")
    parser.add_argument("--list", action="store_true", help="list the stages and exit")
    parser.add_argument("--force", action="store_true",
                        help="rerun the selected stages even when they are up to date")
    parser.add_argument("--executor", help="local | inline | slurm (default: pipeline.executor)")
    parser.add_argument("--dryrun", action="store_true",
                        help="print what each stage would launch (with --executor slurm: the sbatch "
                             "scripts) without running anything")


def run(args, cfg) -> int:
    if args.list:
        from avr_megatron.pipeline.graph import STAGES

        for i, s in enumerate(STAGES, 1):
            print(f"{i:2d} {s.name:18s} avr {' '.join(s.command):15s} {s.what}")
        return 0
    from avr_megatron.pipeline.runner import run_pipeline

    prepare_models = None
    if cfg.pipeline.make_tiny_models:  # CPU test recipes: random tiny models, made once
        from avr_megatron.testing.tiny_models import ensure_tiny_models as prepare_models
    return run_pipeline(cfg, start=args.start, stop=args.stop, only=args.only,
                        executor=args.executor, dryrun=args.dryrun, force=args.force,
                        prepare_models=prepare_models)
