"""The AvR stage graph: one record per stage, holding every fact the pipeline knows about it.

Plain data, no torch: `avr pipeline --list` and the tests read it without importing Megatron.
A record says which `avr` command the stage runs, the resource profile it needs
(launch.slurm.<profile>, and through it the role environment: launch.roles.role_of), whether it
is one process per accelerator (training) or fanned out over synthesis shards, which model it
starts from, where it reads and writes, which checks apply before the run and which figures the
final table shows: avr_megatron.pipeline.stage_configs turns these facts into the stage's config
wiring, fingerprinted inputs and checked outputs, avr_megatron.pipeline.summaries reads the
figures. No stage is special-cased by its name or its command (the command is only run): what
differs between stages is a field here.

Paths are relative to the pipeline's run.dir (R):
  R/synth/<synth_root>/<pass>/   a synthesis pass's output (avr_megatron.synth.store)
  R/data/<data_root>/<dataset>   an SFT / preference dataset written by a pairs stage
  R/models/<stage>/              the HF export of a training stage
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    # `avr` subcommand, e.g. ("synth", "stage1").
    command: tuple[str, ...]
    # synth | train | cpu (StageSpec.resources; the role environment follows from it).
    resources: str
    what: str
    # Synthesis: one task per shard (pipeline.synth_shards); training: torchrun/srun.
    sharded: bool = False
    distributed: bool = False
    # The model this stage generates with, trains from or evaluates: "base" or an earlier
    # stage's name (synth.policy, model.init_from.hf, eval.model).
    model_from: str | None = None
    # Training stages write an HF export under R/models/<name> (checkpoint.export_hf).
    exports_model: bool = False
    # Synthesis and pairs stages: their synthesis output root R/synth/<synth_root>
    # (synth.output_dir).
    synth_root: str | None = None
    # Synthesis stages: the pass they write under synth_root (R/synth/<synth_root>/<pass>),
    # generating with model_from (synth.policy).
    writes_pass: str | None = None
    # The stage-2 search: synth.stage2.start is checked before any stage runs (its source set
    # needs chosen answers when the search starts from them).
    starts_stage2: bool = False
    # Synthesis passes under synth_root whose rows this stage reads.
    reads_passes: tuple[str, ...] = ()
    # Synthesis: reads the recipe's prompt file (synth.input.path) too.
    reads_prompts: bool = False
    # Pairs stages: their dataset root R/data/<data_root> (synth.data_dir) and the datasets
    # they write under it.
    data_root: str | None = None
    writes_datasets: tuple[str, ...] = ()
    # Training and log-prob stages: the dataset under R/data they read (data.train; the base
    # model's tokenizer reads it).
    train_data: str | None = None
    # Log-prob stages: the DPO stage whose reference log-probs this stage stores next to the
    # data. It shares that stage's `pipeline.stages` overrides (sequence length, batch layout),
    # and that stage trains on the stored log-probs (loss.reference: precomputed).
    reference_for: str | None = None
    # Evaluation: the model compared against (eval.baseline_model), "base" or a stage's name,
    # and whether the evaluated model answers with a long refinement thought (eval.long_thought).
    baseline_from: str | None = None
    long_thought: bool = False
    # What the stage writes inside its own run directory (R/stages/<name>/...), checked to exist.
    writes_in_run_dir: tuple[str, ...] = ()
    # What the final table shows for the stage (avr_megatron.pipeline.summaries): the figures of
    # its synthesis pass ("synthesis"), datasets ("pairs"), training run ("training"), stored
    # log-probs ("logps") or evaluation ("eval").
    summary: str | None = None


STAGES: tuple[Stage, ...] = (
    Stage("stage1_trees_base", ("synth", "stage1"), "synth", "stage-1 trees with the base model",
          sharded=True, model_from="base", synth_root="base", writes_pass="stage1", reads_prompts=True,
          summary="synthesis"),
    Stage("stage1_pairs_base", ("pairs", "stage1"), "cpu", "RSFT data from the base-model trees",
          synth_root="base", reads_passes=("stage1",),
          data_root="base", writes_datasets=("stage1/sft", "stage1/preference"),
          summary="pairs"),
    Stage("rsft", ("train", "sft"), "train", "refinement SFT (RSFT) from the base model",
          distributed=True, model_from="base", exports_model=True, train_data="base/stage1/sft",
          summary="training"),
    Stage("stage1_trees", ("synth", "stage1"), "synth", "on-policy stage-1 trees with the RSFT model",
          sharded=True, model_from="rsft", synth_root="onpolicy", writes_pass="stage1", reads_prompts=True,
          summary="synthesis"),
    Stage("stage1_pairs", ("pairs", "stage1"), "cpu", "response / criticism / improvement pairs",
          synth_root="onpolicy", reads_passes=("stage1",),
          data_root="onpolicy", writes_datasets=("stage1/sft", "stage1/preference"),
          summary="pairs"),
    Stage("stage1_ref_logps", ("logps",), "train", "reference log-probs of the stage-1 pairs (RSFT)",
          distributed=True, model_from="rsft", train_data="onpolicy/stage1/preference",
          reference_for="stage1_dpo", summary="logps"),
    Stage("stage1_dpo", ("train", "dpo"), "train", "stage-1 DPO from RSFT: the stage-1 model",
          distributed=True, model_from="rsft", exports_model=True, train_data="onpolicy/stage1/preference",
          summary="training"),
    Stage("stage2_search", ("synth", "stage2"), "synth", "multi-round refinement search with the stage-1 model",
          sharded=True, model_from="stage1_dpo", synth_root="stage2", writes_pass="stage2", reads_prompts=True,
          starts_stage2=True, summary="synthesis"),
    Stage("stage2_sft_data", ("pairs", "stage2"), "cpu", "long refinement thoughts as SFT data",
          synth_root="stage2", reads_passes=("stage2",),
          data_root="thought_sft", writes_datasets=("stage2/sft",), summary="pairs"),
    Stage("thought_sft", ("train", "sft"), "train", "long-thought SFT from the stage-1 model",
          distributed=True, model_from="stage1_dpo", exports_model=True, train_data="thought_sft/stage2/sft",
          summary="training"),
    Stage("stage2_thoughts", ("synth", "thoughts"), "synth", "thoughts sampled from the thought-SFT model, scored",
          sharded=True, model_from="thought_sft", synth_root="stage2", writes_pass="thoughts",
          reads_passes=("stage2",), summary="synthesis"),
    Stage("stage2_pairs", ("pairs", "stage2"), "cpu", "best-vs-worst thought pairs (length-controlled)",
          synth_root="stage2", reads_passes=("stage2", "thoughts"),
          data_root="lcdpo", writes_datasets=("stage2/sft", "stage2/preference"), summary="pairs"),
    Stage("lcdpo_ref_logps", ("logps",), "train", "reference log-probs of the thought pairs (thought SFT)",
          distributed=True, model_from="thought_sft", train_data="lcdpo/stage2/preference",
          reference_for="lcdpo", summary="logps"),
    Stage("lcdpo", ("train", "dpo"), "train", "length-controlled DPO: the final AvR model",
          distributed=True, model_from="thought_sft", exports_model=True, train_data="lcdpo/stage2/preference",
          summary="training"),
    Stage("eval", ("eval",), "synth", "final model vs base model, test-time refinement rounds",
          model_from="lcdpo", baseline_from="base", long_thought=True, writes_in_run_dir=("eval/answers",),
          summary="eval"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
# DPO stage -> the log-prob stage that stores its reference log-probs.
REFERENCE_OF: dict[str, Stage] = {s.reference_for: s for s in STAGES if s.reference_for}


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
