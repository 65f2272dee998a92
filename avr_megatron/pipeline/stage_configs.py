"""One validated config per stage: the recipe, the stage's `pipeline.stages.<name>` overrides,
and the wiring that connects stages (which model a stage starts from, where it reads and writes).

Layout under run.dir (R):
  R/stages/<stage>/       the stage's run.dir: stage.yaml, logs/, checkpoints, summaries
  R/synth/{base,onpolicy,stage2}/   synthesis output roots (synth.output_dir)
  R/data/{base,onpolicy,thought_sft,lcdpo}/   SFT / preference datasets (synth.data_dir)
  R/models/<stage>/       HF exports of the training stages, loaded by the generation engines

Every stage's config is built and validated before the first stage runs, so a typo in a
late stage's overrides fails in the first second, not after hours of synthesis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig
from avr_megatron.config.validate import check_stage2_start
from avr_megatron.pipeline.graph import BY_NAME, STAGES, Stage

# Synthesis output root and dataset root of each synthesis / pairs stage.
SYNTH_ROOT = {"stage1_trees_base": "base", "stage1_pairs_base": "base",
              "stage1_trees": "onpolicy", "stage1_pairs": "onpolicy",
              "stage2_search": "stage2", "stage2_sft_data": "stage2",
              "stage2_thoughts": "stage2", "stage2_pairs": "stage2"}
DATA_ROOT = {"stage1_pairs_base": "base", "stage1_pairs": "onpolicy",
             "stage2_sft_data": "thought_sft", "stage2_pairs": "lcdpo"}
# Training stages: (data root, dataset) they train on; stage -> the dataset directory.
TRAIN_DATA = {"rsft": ("base", "stage1/sft"),
              "stage1_ref_logps": ("onpolicy", "stage1/preference"),
              "stage1_dpo": ("onpolicy", "stage1/preference"),
              "thought_sft": ("thought_sft", "stage2/sft"),
              "lcdpo_ref_logps": ("lcdpo", "stage2/preference"),
              "lcdpo": ("lcdpo", "stage2/preference")}
# What each stage reads beyond its model (stage -> paths relative to R), for skip decisions.
SYNTH_OUT = {"stage1_trees_base": "synth/base/stage1", "stage1_trees": "synth/onpolicy/stage1",
             "stage2_search": "synth/stage2/stage2", "stage2_thoughts": "synth/stage2/thoughts"}
# Fingerprinted are the data files only, not summaries or manifests (they hold timings and
# absolute paths), so identical results count as identical wherever and whenever they were made.
READS = {"stage1_pairs_base": ["synth/base/stage1/data"], "stage1_pairs": ["synth/onpolicy/stage1/data"],
         "stage2_sft_data": ["synth/stage2/stage2/data"],
         "stage2_thoughts": ["synth/stage2/stage2/data"],
         "stage2_pairs": ["synth/stage2/stage2/data", "synth/stage2/thoughts/data"],
         "stage1_dpo": ["data/onpolicy/stage1/preference.ref_logps/logps.parquet"],
         "lcdpo": ["data/lcdpo/stage2/preference.ref_logps/logps.parquet"]}
# The datasets each pairs stage writes (under its data root).
PAIRS_OUT = {"stage1_pairs_base": ["stage1/sft", "stage1/preference"],
             "stage1_pairs": ["stage1/sft", "stage1/preference"],
             "stage2_sft_data": ["stage2/sft"], "stage2_pairs": ["stage2/sft", "stage2/preference"]}


@dataclass(frozen=True)
class StagePlan:
    stage: Stage
    cfg: AvrConfig
    dir: Path
    config_path: Path
    # Paths whose content decides whether a finished stage is still up to date.
    inputs: tuple[Path, ...]
    # What the stage produces (checked to exist before a stage counts as done).
    outputs: tuple[Path, ...]
    # The HF model this stage exports (training stages), removed before a rerun.
    export: Path | None


def model_dir(cfg: AvrConfig, name: str) -> Path:
    """HF directory of the base model ("base") or of a training stage's export."""
    if name == "base":
        return Path(cfg.pipeline.base_model)
    return Path(cfg.run.dir).resolve() / "models" / name


def _wiring(stage: Stage, cfg: AvrConfig, root: Path) -> tuple[dict[str, Any], list[Path], list[Path]]:
    name = stage.name
    w: dict[str, Any] = {"run": {"dir": str(root / "stages" / name)}}
    inputs = [root / p for p in READS.get(name, [])]
    outputs: list[Path] = []
    base = model_dir(cfg, "base")
    model = model_dir(cfg, stage.model_from) if stage.model_from else None
    synth: dict[str, Any] = {}
    if name in SYNTH_ROOT:
        synth["output_dir"] = str(root / "synth" / SYNTH_ROOT[name])
    held_out = cfg.synth.pairs.valid_fraction > 0  # `avr pairs` writes held-out splits
    if held_out:
        from avr_megatron.synth.pairs import valid_dir
    if name in DATA_ROOT:
        synth["data_dir"] = str(root / "data" / DATA_ROOT[name])
        outputs += [root / "data" / DATA_ROOT[name] / d for d in PAIRS_OUT[name]]
        if held_out:
            outputs += [valid_dir(root / "data" / DATA_ROOT[name] / d) for d in PAIRS_OUT[name]]
    if stage.command[0] == "synth":
        # Provenance names the pipeline model ("base", "rsft", ...), not a run-specific path.
        synth["policy"] = {"model": str(model), "name": f"{cfg.run.name}:{stage.model_from}"}
        inputs.append(model)
        outputs.append(root / SYNTH_OUT[name] / "data")
        if stage.command[1] == "stage1" or stage.command[1] == "stage2":
            if cfg.synth.input.path:
                inputs.append(Path(cfg.synth.input.path))
    if synth:
        w["synth"] = synth
    if name in TRAIN_DATA:
        data_root, dataset = TRAIN_DATA[name]
        train = root / "data" / data_root / dataset
        w["data"] = {"train": str(train), "tokenizer": str(base)}
        w["model"] = {"init_from": {"hf": str(model), "mcore": None}}
        inputs += [train, model]
        if stage.command == ("logps",):
            outputs.append(Path(str(train) + ".ref_logps") / "logps.parquet")
        if stage.command == ("train", "dpo"):
            w["loss"] = {"reference": "precomputed"}  # from the *_ref_logps stage before it
        if held_out:
            valid = valid_dir(train)
            w["data"]["valid"] = str(valid)
            inputs.append(valid)
            store = Path(str(valid) + ".ref_logps") / "logps.parquet"
            if stage.command == ("logps",):
                outputs.append(store)
            if stage.command == ("train", "dpo"):
                inputs.append(store)
    if stage.exports_model:
        w.setdefault("checkpoint", {})["export_hf"] = str(model_dir(cfg, name))
        outputs.append(model_dir(cfg, name))
    if name == "eval":
        w["eval"] = {"model": str(model), "baseline_model": str(base), "long_thought": True}
        inputs += [model, base]
        outputs.append(root / "stages" / "eval" / "eval" / "answers")
    return w, inputs, outputs


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Leaf key paths of a nested mapping -> their values (a non-empty mapping is not a leaf)."""
    if isinstance(tree, Mapping) and (tree or not prefix):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _check_wiring_conflicts(stage: Stage, wiring: dict[str, Any],
                           layers: list[tuple[Any, str]]) -> None:
    """A user override of a key the pipeline wires (where a stage reads, writes and starts from)
    would be replaced by the wiring: refuse it, naming both values. An override equal to the
    wired value is accepted. `layers`: (user overrides, where they come from)."""
    wired = _leaves(wiring)
    conflicts = []
    for layer, source in layers:
        for upath, uvalue in _leaves(layer or {}).items():
            if isinstance(uvalue, Mapping):  # an empty mapping overrides nothing
                continue
            for wpath, wvalue in wired.items():
                n = min(len(upath), len(wpath))
                if upath[:n] != wpath[:n] or (upath == wpath and uvalue == wvalue):
                    continue
                conflicts.append(f"{source} sets {'.'.join(upath)}={uvalue!r}, but the pipeline "
                                 f"wires {'.'.join(wpath)}={wvalue!r} for stage {stage.name}")
    if conflicts:
        raise ConfigError("; ".join(conflicts) + ". The pipeline connects its stages through "
                          "these keys: remove the override (run.dir and pipeline.base_model "
                          "move them).")


def _stage_config(base_cfg: AvrConfig, stage: Stage, wiring: dict[str, Any]) -> AvrConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from avr_megatron.config.loader import merge_checked
    from avr_megatron.config.validate import validate_config

    merged = OmegaConf.structured(base_cfg)
    user = base_cfg.pipeline.stages.get(stage.name) or {}
    # The logps stages compute the reference of the DPO stage that follows them: they share its
    # overrides (sequence length, batch layout) so the stored log-probs match its batches.
    dpo = {"stage1_ref_logps": "stage1_dpo", "lcdpo_ref_logps": "lcdpo"}.get(stage.name)
    layers = ([(base_cfg.pipeline.stages.get(dpo) or {}, f"pipeline.stages.{dpo}")] if dpo else [])
    layers += [(user, f"pipeline.stages.{stage.name}")]
    _check_wiring_conflicts(stage, wiring, layers)
    layers += [(wiring, f"pipeline wiring of {stage.name}")]
    for layer, source in layers:
        merged = merge_checked(merged, OmegaConf.create(layer), source)
    try:
        cfg: AvrConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"pipeline.stages.{stage.name}: {e}") from None
    try:
        validate_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name} (recipe + pipeline.stages.{stage.name}): {e}") from None
    return cfg


def plan_stages(cfg: AvrConfig, stages: list[Stage] | None = None) -> list[StagePlan]:
    """Build, validate and return the plan of every stage (all of them are checked even when
    only some will run)."""
    unknown = sorted(set(cfg.pipeline.stages) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"pipeline.stages: unknown stage(s) {unknown}; stages: {', '.join(BY_NAME)}")
    for name, layer in cfg.pipeline.stages.items():
        if layer is not None and not isinstance(layer, dict):
            raise ConfigError(f"pipeline.stages.{name} must be a mapping of recipe keys, got {layer!r}")
    if not cfg.pipeline.base_model:
        raise ConfigError("pipeline.base_model is not set: the HF directory of the seed policy")
    root = Path(cfg.run.dir).resolve()
    plans = []
    for stage in STAGES:
        wiring, inputs, outputs = _wiring(stage, cfg, root)
        stage_cfg = _stage_config(cfg, stage, wiring)
        if stage_cfg.synth.pairs.valid_fraction != cfg.synth.pairs.valid_fraction:
            raise ConfigError(f"pipeline.stages.{stage.name} sets synth.pairs.valid_fraction: set it in the "
                              "recipe, for every stage (the training stages read the held-out splits it makes)")
        if stage.command == ("synth", "stage2"):
            try:
                check_stage2_start(stage_cfg)
            except ConfigError as e:
                raise ConfigError(f"stage {stage.name} (recipe + pipeline.stages.{stage.name}): {e}") from None
        d = root / "stages" / stage.name
        plans.append(StagePlan(stage, stage_cfg, d, d / "stage.yaml", tuple(inputs), tuple(outputs),
                               model_dir(cfg, stage.name) if stage.exports_model else None))
    wanted = {s.name for s in stages} if stages is not None else None
    return [p for p in plans if wanted is None or p.stage.name in wanted]
