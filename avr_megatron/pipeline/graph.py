"""The AvR stage graph: which `avr` command each stage runs, in which order, reading what.

Plain data, no torch: `avr pipeline --list` and the tests read it without importing Megatron.
Each stage names the command it runs, the resource profile it needs (launch.slurm.<profile>),
whether it is one process per accelerator (training) or fanned out over synthesis shards, and
which stage's model it uses. Paths are wired in avr_megatron.pipeline.stage_configs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    # `avr` subcommand, e.g. ("synth", "stage1").
    command: tuple[str, ...]
    # synth | train | cpu (StageSpec.resources).
    resources: str
    what: str
    # Synthesis: one task per shard (pipeline.synth_shards); training: torchrun/srun.
    sharded: bool = False
    distributed: bool = False
    # The model this stage generates with or trains from: "base" or an earlier stage's name.
    model_from: str | None = None
    # Training stages write an HF export under <run.dir>/models/<name>.
    exports_model: bool = False


STAGES: tuple[Stage, ...] = (
    Stage("stage1_trees_base", ("synth", "stage1"), "synth", "stage-1 trees with the base model",
          sharded=True, model_from="base"),
    Stage("stage1_pairs_base", ("pairs", "stage1"), "cpu", "RSFT data from the base-model trees"),
    Stage("rsft", ("train", "sft"), "train", "refinement SFT (RSFT) from the base model",
          distributed=True, model_from="base", exports_model=True),
    Stage("stage1_trees", ("synth", "stage1"), "synth", "on-policy stage-1 trees with the RSFT model",
          sharded=True, model_from="rsft"),
    Stage("stage1_pairs", ("pairs", "stage1"), "cpu", "response / criticism / improvement pairs"),
    Stage("stage1_ref_logps", ("logps",), "train", "reference log-probs of the stage-1 pairs (RSFT)",
          distributed=True, model_from="rsft"),
    Stage("stage1_dpo", ("train", "dpo"), "train", "stage-1 DPO from RSFT: the stage-1 model",
          distributed=True, model_from="rsft", exports_model=True),
    Stage("stage2_search", ("synth", "stage2"), "synth", "multi-round refinement search with the stage-1 model",
          sharded=True, model_from="stage1_dpo"),
    Stage("stage2_sft_data", ("pairs", "stage2"), "cpu", "long refinement thoughts as SFT data"),
    Stage("thought_sft", ("train", "sft"), "train", "long-thought SFT from the stage-1 model",
          distributed=True, model_from="stage1_dpo", exports_model=True),
    Stage("stage2_thoughts", ("synth", "thoughts"), "synth", "thoughts sampled from the thought-SFT model, scored",
          sharded=True, model_from="thought_sft"),
    Stage("stage2_pairs", ("pairs", "stage2"), "cpu", "best-vs-worst thought pairs (length-controlled)"),
    Stage("lcdpo_ref_logps", ("logps",), "train", "reference log-probs of the thought pairs (thought SFT)",
          distributed=True, model_from="thought_sft"),
    Stage("lcdpo", ("train", "dpo"), "train", "length-controlled DPO: the final AvR model",
          distributed=True, model_from="thought_sft", exports_model=True),
    Stage("eval", ("eval",), "synth", "final model vs base model, test-time refinement rounds",
          model_from="lcdpo"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def select(start: str | None = None, stop: str | None = None, only: str | None = None) -> list[Stage]:
    """The stages to run: all, `--from start`, `--to stop` (inclusive), or `--only` one."""
    for flag, name in (("--from", start), ("--to", stop), ("--only", only)):
        if name is not None and name not in BY_NAME:
            raise ValueError(f"{flag} {name!r} is not a pipeline stage; stages: {', '.join(STAGE_NAMES)}")
    if only is not None:
        if start is not None or stop is not None:
            raise ValueError("--only cannot be combined with --from/--to")
        return [BY_NAME[only]]
    i = STAGE_NAMES.index(start) if start else 0
    j = STAGE_NAMES.index(stop) if stop else len(STAGES) - 1
    if i > j:
        raise ValueError(f"--from {start} comes after --to {stop}")
    return list(STAGES[i:j + 1])
