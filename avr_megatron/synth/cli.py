"""Handlers of `avr synth stage1|stage2|thoughts` and `avr pairs stage1|stage2`."""

from __future__ import annotations

import argparse


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", metavar="i/N", default=None,
                        help="process shard i of N (rows with row %% N == i), e.g. $SLURM_ARRAY_TASK_ID/4; "
                             "each shard writes its own files in the same output directory")


def _synth(kind: str, args, cfg) -> int:
    from avr_megatron.synth.driver import run_pass
    from avr_megatron.synth.inputs import parse_shard

    run_pass(kind, cfg, parse_shard(args.shard))
    return 0


def synth_stage1(args, cfg) -> int:
    return _synth("stage1", args, cfg)


def synth_stage2(args, cfg) -> int:
    return _synth("stage2", args, cfg)


def synth_thoughts(args, cfg) -> int:
    return _synth("thoughts", args, cfg)


def pairs_stage1(args, cfg) -> int:
    from avr_megatron.synth.pairs import pairs_stage1 as build

    build(cfg)
    return 0


def pairs_stage2(args, cfg) -> int:
    from avr_megatron.synth.pairs import pairs_stage2 as build

    build(cfg)
    return 0
