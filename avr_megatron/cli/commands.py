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
    # Save the resolved config as <run.dir>/config.yaml (commands without a run directory, such
    # as `avr convert`, write nothing there).
    saves_config: bool = True
    aliases: tuple[str, ...] = field(default_factory=tuple)


COMMANDS: list[Command] = [
    Command(("info",), "print versions, devices and which code paths are active",
            "avr_megatron.cli.info:run", "avr_megatron.cli.info:add_arguments",
            takes_recipe=False),
    Command(("smoke",), "train on synthetic counting sequences: checks an install or a layout",
            "avr_megatron.cli.smoke:run"),
    Command(("prepare",), "tokenise data.train (and data.valid) once into memory-mapped files "
            "that train and logps map", "avr_megatron.cli.prepare:run",
            "avr_megatron.cli.prepare:add_arguments"),
    Command(("train", "sft"), "supervised fine-tuning on chat data (assistant tokens only)",
            "avr_megatron.cli.train:sft"),
    Command(("train", "dpo"), "preference optimisation (DPO, IPO, cDPO, reward-gap aware) on "
            "preference pairs", "avr_megatron.cli.train:dpo"),
    Command(("logps",), "compute the reference model's log-probs of every preference pair and "
            "store them next to the data", "avr_megatron.cli.train:logps"),
    Command(("synth", "stage1"), "stage-1 refinement trees: k criticisms x m improvements of y0, scored",
            "avr_megatron.synth.cli:synth_stage1", "avr_megatron.synth.cli:add_shard_argument"),
    Command(("synth", "stage2"), "stage-2 multi-round refinement search with the stage-1 model",
            "avr_megatron.synth.cli:synth_stage2", "avr_megatron.synth.cli:add_shard_argument"),
    Command(("synth", "thoughts"), "sample long thoughts from the thought-SFT model and score their final answers",
            "avr_megatron.synth.cli:synth_thoughts", "avr_megatron.synth.cli:add_shard_argument"),
    Command(("synth", "serve"), "start vLLM's OpenAI-compatible server for synth.policy or synth.reward with the "
            "recipe's engine settings (for backend=server)",
            "avr_megatron.engines.serve:run", "avr_megatron.engines.serve:add_arguments"),
    Command(("pairs", "stage1"), "RSFT conversations and the three preference pair types from stage-1 trees",
            "avr_megatron.synth.cli:pairs_stage1"),
    Command(("pairs", "stage2"), "long-thought SFT examples and best-vs-worst thought pairs from stage-2 output",
            "avr_megatron.synth.cli:pairs_stage2"),
    Command(("eval",), "answers of a model on a prompt set, refined at test time for eval.rounds rounds, "
            "scored against a baseline model's answers (win rate, table, plot, AlpacaEval export)",
            "avr_megatron.evaluation.cli:run"),
    Command(("pipeline",), "the whole AvR pipeline: synthesis, RSFT, DPO, long-thought SFT, "
            "length-controlled DPO and evaluation, resumable stage by stage",
            "avr_megatron.cli.pipeline:run", "avr_megatron.cli.pipeline:add_arguments"),
    Command(("convert", "hf-to-mcore"),
            "convert a Hugging Face Llama directory into a Megatron dist checkpoint",
            "avr_megatron.cli.convert:run_hf_to_mcore",
            "avr_megatron.cli.convert:add_hf_to_mcore_arguments", saves_config=False),
    Command(("convert", "mcore-to-hf"),
            "export a Megatron dist checkpoint (any TP/PP) to a Hugging Face directory",
            "avr_megatron.cli.convert:run_mcore_to_hf",
            "avr_megatron.cli.convert:add_mcore_to_hf_arguments", saves_config=False),
]


def resolve(spec: str) -> Callable:
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
