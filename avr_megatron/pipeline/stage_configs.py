"""One resolved config per stage: the recipe, the stage's `pipeline.stages.<name>` overrides,
and the wiring that connects stages (which model a stage starts from, where it reads and writes),
derived here from the stage's record in avr_megatron.pipeline.graph and layered, checked,
validated and frozen by config/resolve.py's resolve_stage_config.

Layout under run.dir (R):
  R/stages/<stage>/       the stage's run.dir: stage.yaml, logs/, checkpoints, summaries
  R/synth/{base,onpolicy,stage2}/   synthesis output roots (synth.output_dir)
  R/data/{base,onpolicy,thought_sft,lcdpo}/   SFT / preference datasets (synth.data_dir)
  R/models/<stage>/       HF exports of the training stages, loaded by the generation engines

Every stage's config is built and validated before the first stage runs, so a typo in a
late stage's overrides fails in the first second, not after hours of synthesis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.resolve import resolve_stage_config
from avr_megatron.config.schema import AvrConfig
from avr_megatron.config.validate import check_stage2_start
from avr_megatron.pipeline.graph import BY_NAME, REFERENCE_OF, STAGES, Stage


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
    # What a fresh start of this stage removes: the directory owning each output (a synthesis
    # store, a log-prob store, a dataset, an export, the eval answers), one per output.
    owns: tuple[Path, ...] = ()


def model_dir(cfg: AvrConfig, name: str) -> Path:
    """HF directory of the base model ("base") or of a training stage's export."""
    if name == "base":
        return Path(cfg.pipeline.base_model)
    return Path(cfg.run.dir).resolve() / "models" / name


@dataclass
class _Wiring:
    """A stage's wired keys, with what it reads and writes (output path -> the directory a
    fresh start removes), built from its record in the stage graph."""

    keys: dict[str, Any]
    inputs: list[Path]
    outputs: dict[Path, Path]


def _wiring(stage: Stage, cfg: AvrConfig, root: Path) -> _Wiring:
    w = _Wiring({"run": {"dir": str(root / "stages" / stage.name)}}, [], {})
    base = model_dir(cfg, "base")
    model = model_dir(cfg, stage.model_from) if stage.model_from else None
    synth_out = root / "synth" / stage.synth_root if stage.synth_root else None
    # Fingerprinted are the data files only, not summaries or manifests (they hold timings and
    # absolute paths), so identical results count as identical wherever and whenever they were made.
    w.inputs += [synth_out / kind / "data" for kind in stage.reads_passes]
    reference = REFERENCE_OF.get(stage.name)
    if reference is not None:
        w.inputs.append(_logps_store(root / "data" / reference.train_data))
    synth: dict[str, Any] = {}
    if synth_out is not None:
        synth["output_dir"] = str(synth_out)
    held_out = cfg.synth.pairs.valid_fraction > 0  # `avr pairs` writes held-out splits
    if held_out:
        from avr_megatron.synth.pairs import valid_dir
    if stage.data_root:
        data = root / "data" / stage.data_root
        synth["data_dir"] = str(data)
        w.outputs.update({data / d: data / d for d in stage.writes_datasets})
        if held_out:
            w.outputs.update({valid_dir(data / d): valid_dir(data / d) for d in stage.writes_datasets})
    if stage.writes_pass:
        # Provenance names the pipeline model ("base", "rsft", ...), not a run-specific path.
        synth["policy"] = {"model": str(model), "name": f"{cfg.run.name}:{stage.model_from}"}
        w.inputs.append(model)
        w.outputs[synth_out / stage.writes_pass / "data"] = synth_out / stage.writes_pass
        if stage.reads_prompts and cfg.synth.input.path:
            w.inputs.append(Path(cfg.synth.input.path))
    if synth:
        w.keys["synth"] = synth
    if stage.train_data:
        train = root / "data" / stage.train_data
        w.keys["data"] = {"train": str(train), "tokenizer": str(base)}
        w.keys["model"] = {"init_from": {"hf": str(model), "mcore": None}}
        w.inputs += [train, model]
        datasets = [train]
        if held_out:
            valid = valid_dir(train)
            w.keys["data"]["valid"] = str(valid)
            w.inputs.append(valid)
            datasets.append(valid)
        stores = [_logps_store(d) for d in datasets]
        if stage.reference_for:
            w.outputs.update({s: s.parent for s in stores})
        if reference is not None:
            w.keys["loss"] = {"reference": "precomputed"}  # from the log-prob stage before it
            w.inputs += stores[1:]  # the training set's store is listed first (above)
    if stage.exports_model:
        w.keys.setdefault("checkpoint", {})["export_hf"] = str(model_dir(cfg, stage.name))
        w.outputs[model_dir(cfg, stage.name)] = model_dir(cfg, stage.name)
    if stage.baseline_from:
        baseline = model_dir(cfg, stage.baseline_from)
        w.keys["eval"] = {"model": str(model), "baseline_model": str(baseline),
                          "long_thought": stage.long_thought}
        w.inputs += [model, baseline]
    for rel in stage.writes_in_run_dir:
        out = root / "stages" / stage.name / rel
        w.outputs[out] = out.parent
    return w


def _logps_store(data: Path) -> Path:
    """Where a log-prob stage stores the reference log-probs of a dataset: next to it."""
    return Path(str(data) + ".ref_logps") / "logps.parquet"


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
        wiring = _wiring(stage, cfg, root)
        # The logps stages compute the reference of the DPO stage that follows them: they share
        # its overrides (sequence length, batch layout) so the stored log-probs match its batches.
        shared = (stage.reference_for,) if stage.reference_for else ()
        stage_cfg = resolve_stage_config(cfg, stage.name, wiring.keys, shares_overrides_of=shared)
        if stage_cfg.synth.pairs.valid_fraction != cfg.synth.pairs.valid_fraction:
            raise ConfigError(f"pipeline.stages.{stage.name} sets synth.pairs.valid_fraction: set it in the "
                              "recipe, for every stage (the training stages read the held-out splits it makes)")
        if stage.starts_stage2:
            try:
                check_stage2_start(stage_cfg)
            except ConfigError as e:
                raise ConfigError(f"stage {stage.name} (recipe + pipeline.stages.{stage.name}): {e}") from None
        d = root / "stages" / stage.name
        plans.append(StagePlan(stage, stage_cfg, d, d / "stage.yaml", tuple(wiring.inputs),
                               tuple(wiring.outputs), model_dir(cfg, stage.name) if stage.exports_model
                               else None, tuple(wiring.outputs.values())))
    wanted = {s.name for s in stages} if stages is not None else None
    return [p for p in plans if wanted is None or p.stage.name in wanted]
