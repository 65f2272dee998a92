"""The `avr` command table. Each leaf command names its handler as "module:function" so that
`avr --help` and `avr info` import nothing heavy; handlers take (args, cfg)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    help: str
    handler: str  # "module:function", called as function(args, cfg)
    # Extra argparse arguments: "module:function" taking the subparser.
    arguments: str | None = None
    # Commands without a recipe (info) get cfg=None.
    takes_recipe: bool = True
    aliases: tuple[str, ...] = field(default_factory=tuple)


COMMANDS: list[Command] = [
    Command(("info",), "print versions, devices and which code paths are active",
            "avr_megatron.cli.info:run", "avr_megatron.cli.info:add_arguments",
            takes_recipe=False),
    Command(("smoke",), "train on synthetic counting sequences: checks an install or a layout",
            "avr_megatron.cli.smoke:run"),
    Command(("train", "sft"), "supervised fine-tuning on chat data (assistant tokens only)",
            "avr_megatron.cli.train:sft"),
    Command(("train", "dpo"), "preference optimisation (DPO, IPO, cDPO, reward-gap aware) on "
            "preference pairs", "avr_megatron.cli.train:dpo"),
    Command(("logps",), "compute the reference model's log-probs of every preference pair and "
            "store them next to the data", "avr_megatron.cli.train:logps"),
]


def resolve(spec: str) -> Callable:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
