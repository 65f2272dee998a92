"""`avr`: every subcommand takes `--recipe FILE` plus `key=value` overrides; `run.dir=PATH` says
where it reads and writes, and the resolved config is saved there as config.yaml."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from avr_megatron.cli.commands import COMMANDS, Command, resolve


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avr", description="Alignment via Refinement on Megatron-Core.",
        epilog="Overrides are omegaconf dotlist items, e.g. `parallel.tensor_model_parallel_size=2"
               " run.dir=runs/x`.")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.path)):
            prefix = cmd.path[:depth]
            if prefix not in parsers:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                parsers[prefix] = sub
                groups[prefix] = sub.add_subparsers(dest=f"command_{depth}", metavar="COMMAND",
                                                    required=True)
        leaf = groups[cmd.path[:-1]].add_parser(cmd.path[-1], help=cmd.help,
                                               description=cmd.help)
        leaf.set_defaults(_command=cmd)
        if cmd.takes_recipe:
            leaf.add_argument("--recipe", "-r", help="omegaconf YAML recipe (see recipes/)")
            leaf.add_argument("overrides", nargs="*", metavar="key=value",
                              help="dotlist overrides applied on top of the recipe")
        if cmd.arguments:
            resolve(cmd.arguments)(leaf)
    return parser


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _load(cmd: Command, args: argparse.Namespace):
    from avr_megatron.config import load_config, save_config

    cfg = load_config(args.recipe, args.overrides)
    if cmd.saves_config and _is_rank0():
        from avr_megatron.runtime.files import STALE_FILE, remove_stale

        # Temporaries of a killed run (config, summaries, metrics): their writer is gone.
        remove_stale(cfg.run.dir, STALE_FILE)
        save_config(cfg, Path(cfg.run.dir) / "config.yaml")
    return cfg


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own (not a call from tests or another command)
        from avr_megatron.training.signals import install_startup_handlers

        install_startup_handlers()
    parser = _build_parser()
    args = parser.parse_args(argv)
    cmd: Command = args._command
    logging.basicConfig(level=os.environ.get("AVR_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Megatron-Core logs its whole config at INFO; keep it for AVR_LOG_LEVEL=DEBUG.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("megatron").setLevel(logging.WARNING)
    from avr_megatron.runtime.noise import quiet_known_noise

    quiet_known_noise()
    from avr_megatron.config import ConfigError
    from avr_megatron.runtime.files import EXIT_STORAGE, StorageError, storage_error

    try:
        cfg = _load(cmd, args) if cmd.takes_recipe else None
        result = resolve(cmd.handler)(args, cfg)
    except ConfigError as e:
        print(f"avr {' '.join(cmd.path)}: error: {e}", file=sys.stderr)
        return 2
    except (StorageError, OSError) as e:  # disk full / read-only anywhere: say so, exit 74
        error = e if isinstance(e, StorageError) else storage_error(
            e.filename or ".", e, kept="everything finished before (every avr command writes "
                                       "atomically and resumes where it stopped)", probe=False)
        if error is None:
            raise
        print(f"avr {' '.join(cmd.path)}: error: {error}", file=sys.stderr)
        return EXIT_STORAGE
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
