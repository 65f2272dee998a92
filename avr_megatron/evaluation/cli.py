"""Handler of `avr eval`."""

from __future__ import annotations


def run(args, cfg) -> int:
    from avr_megatron.evaluation.run import run_eval

    run_eval(cfg)
    return 0
