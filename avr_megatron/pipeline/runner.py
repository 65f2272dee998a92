"""`avr pipeline`: run the selected stages in order through an executor, skipping the ones
that are up to date, recording everything in <run.dir>/pipeline.json."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.loader import save_config
from avr_megatron.config.placeholders import pipeline_placeholders, placeholder_message
from avr_megatron.config.schema import AvrConfig
from avr_megatron.launch.roles import role_of, role_python
from avr_megatron.pipeline.executors import make_executor
from avr_megatron.pipeline.graph import select
from avr_megatron.pipeline.local import stop_leftovers
from avr_megatron.pipeline.manifest import Manifest, fingerprint, text_fingerprint
from avr_megatron.pipeline.spec import StageFailed, StageSpec, StageTask
from avr_megatron.pipeline.stage_configs import StagePlan, plan_stages
from avr_megatron.pipeline.summaries import stage_summary


# Makes the models a recipe asks the pipeline to make (pipeline.make_tiny_models).
ModelHook = Callable[[AvrConfig], None]


class Interrupted(Exception):
    """SIGTERM / SIGINT reached the pipeline: the running stage is stopped and recorded."""


def stage_spec(plan: StagePlan, shards: int) -> StageSpec:
    argv = (*plan.stage.command, "--recipe", str(plan.config_path))
    if plan.stage.sharded and shards > 1:
        tasks = tuple(StageTask(f"shard-{i}-of-{shards}", (*argv, "--shard", f"{i}/{shards}"))
                      for i in range(shards))
    else:
        tasks = (StageTask("main", argv, distributed=plan.stage.distributed),)
    return StageSpec(plan.stage.name, tasks, plan.stage.resources, plan.dir / "logs")


def check_environments(cfg: AvrConfig, plans: list[StagePlan], executor: str) -> None:
    """Before the first stage: each role's interpreter that runs on this machine (or on a
    shared file system) holds that role's packages (`python -m avr_megatron.launch.roles`).
    Containers and interpreters behind an SSH tunnel are not reachable from here."""
    for role in sorted({role_of(p.stage.resources) for p in plans}):
        env = getattr(cfg.pipeline.envs, role)
        if executor == "slurm" and (env.container_image or cfg.launch.slurm.tunnel == "ssh"):
            continue
        python = role_python(cfg, role)
        try:
            proc = subprocess.run([*python, "-m", "avr_megatron.launch.roles", role],
                                  capture_output=True, text=True, timeout=300)
            ok, why = proc.returncode == 0, (proc.stdout + proc.stderr).strip()
        except OSError as e:
            ok, why = False, str(e)
        if not ok:
            raise ConfigError(
                f"pipeline.envs.{role}.python={shlex.join(python)} is not a {role} environment "
                f"({why.splitlines()[-1] if why else 'no output'}); point it at the Python of an "
                f"environment installed from requirements/{role}.txt\n{why}")


def config_fingerprint(plan: StagePlan) -> str:
    """What decides whether a finished stage is current: its config without where and how it
    runs (pipeline.envs, pipeline.executor, launch.*), so moving to another environment,
    executor or partition does not redo finished work."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(OmegaConf.structured(plan.cfg))
    c.pop("launch", None)
    c["pipeline"].pop("envs", None)
    c["pipeline"].pop("executor", None)
    return text_fingerprint(OmegaConf.to_yaml(c))


def _check_models(cfg: AvrConfig, prepare_models: ModelHook | None) -> None:
    if cfg.pipeline.make_tiny_models:
        if prepare_models is None:
            raise ConfigError("pipeline.make_tiny_models=true, but this caller of run_pipeline "
                              "passed no prepare_models hook (`avr pipeline` passes "
                              "avr_megatron.testing.tiny_models.ensure_tiny_models)")
        prepare_models(cfg)
    # The base model initialises RSFT through the HF converter: it must be a local directory.
    if not Path(cfg.pipeline.base_model).is_dir():
        raise ConfigError(f"pipeline.base_model={cfg.pipeline.base_model}: not found (the HF "
                          "directory of the seed policy)")


def _raise_interrupt(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def run_pipeline(cfg: AvrConfig, *, start: str | None = None, stop: str | None = None,
                 only: str | None = None, executor: str | None = None, dryrun: bool = False,
                 force: bool = False, out=sys.stdout,
                 prepare_models: ModelHook | None = None) -> int:
    """Run the selected stages in order. `prepare_models(cfg)` makes the models the recipe asks
    for before the first stage (pipeline.make_tiny_models: the CLI passes the tiny-model maker),
    so this package needs nothing from avr_megatron.testing."""
    try:
        selected = select(start, stop, only)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    plans = plan_stages(cfg, selected)
    root = Path(cfg.run.dir).resolve()
    name = executor or cfg.pipeline.executor
    try:
        ex = make_executor(name, cfg)
    except KeyError as e:
        raise ConfigError(f"--executor / pipeline.executor: {e.args[0]}") from None
    found = pipeline_placeholders(cfg, name)
    if found and not dryrun:
        raise ConfigError(placeholder_message(found))
    if dryrun:
        for item in found:
            print(f"WARNING: placeholder {item}: edit it before running", file=out)
        for plan in plans:
            save_config(plan.cfg, plan.config_path)  # so the printed config paths can be read
            print(f"## stage {plan.stage.name}: {plan.stage.what}  (config {plan.config_path})", file=out)
            print(ex.dryrun(stage_spec(plan, cfg.pipeline.synth_shards)), file=out)
        return 0
    check_environments(cfg, plans, name)
    _check_models(cfg, prepare_models)
    manifest = Manifest(root / "pipeline.json")
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for i, plan in enumerate(plans, 1):
            code = _run_one(plan, ex, manifest, root, cfg, f"[{i}/{len(plans)}]", out, force)
            if code:
                break
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print_report(plans, manifest, root, out)
    return code


def _run_one(plan: StagePlan, ex: Any, manifest: Manifest, root: Path, cfg: AvrConfig,
             counter: str, out, force: bool = False) -> int:
    name = plan.stage.name
    save_config(plan.cfg, plan.config_path)
    config_fp = config_fingerprint(plan)
    inputs = {str(p): fingerprint(p) for p in plan.inputs}
    current, reason = manifest.is_current(name, config_fp, inputs, list(plan.outputs))
    if force:
        reason = "--force"
    elif current:
        print(f"{counter} {name}: up to date, skipped", file=out)
        return 0
    print(f"{counter} {name}: {plan.stage.what} ({reason}; logs in {plan.dir / 'logs'})",
          file=out, flush=True)
    # Processes a hard-killed earlier run left behind would keep writing (even exporting) while
    # this run cleans up: stop them first.
    stop_leftovers(plan.dir / "logs")
    if plan.export is not None and plan.export.exists():
        shutil.rmtree(plan.export)  # a stale export of an earlier, unfinished run
    previous = manifest.entry(name)
    resumable = (previous.get("status") in ("running", "interrupted", "failed")
                 and previous.get("config_fingerprint") == config_fp and previous.get("inputs") == inputs)
    if previous and not resumable:
        start_fresh(plan)
    manifest.start(name, config_fp, inputs)
    t0 = time.time()
    try:
        ex.run_stage(stage_spec(plan, cfg.pipeline.synth_shards))
    except StageFailed as e:
        manifest.finish(name, "failed", error=str(e))
        print(f"avr pipeline: {e}", file=sys.stderr)
        print(f"rerun the same command to resume from {name}", file=sys.stderr)
        return 1
    except (Interrupted, KeyboardInterrupt) as e:
        manifest.finish(name, "interrupted")
        print(f"avr pipeline: interrupted ({e or 'SIGINT'}) during {name}; rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    outputs = {str(p): fingerprint(p) for p in plan.outputs}
    manifest.finish(name, "done", outputs, stage_summary(plan))
    print(f"{counter} {name}: done in {time.time() - t0:.0f} s", file=out, flush=True)
    return 0


def start_fresh(plan: StagePlan) -> None:
    """A stage whose config or inputs changed starts over: its checkpoints, metrics and outputs
    from the earlier run are removed (its logs and stage.yaml stay), so nothing resumes from
    weights or shards that belong to other settings."""
    for child in plan.dir.iterdir() if plan.dir.exists() else ():
        if child.name not in ("logs", "stage.yaml"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for owner in plan.owns:
        if owner.is_dir():
            shutil.rmtree(owner)
        elif owner.exists():
            owner.unlink()


def print_report(plans: list[StagePlan], manifest: Manifest, root: Path, out) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"avr pipeline: {root}")
    for col in ("stage", "status", "seconds", "produced", "outputs"):
        table.add_column(col)
    for plan in plans:
        e = manifest.entry(plan.stage.name)
        summary = ", ".join(f"{k} {v}" for k, v in (e.get("summary") or {}).items())
        outputs = "\n".join(str(Path(p).relative_to(root)) if Path(p).is_relative_to(root) else p
                            for p in plan.outputs)
        table.add_row(plan.stage.name, e.get("status", "not run"), str(e.get("seconds", "")),
                      summary, outputs)
    Console(file=out, width=160).print(table)
    print(f"run directory {root}: manifest pipeline.json, stage configs and logs in stages/, "
          f"models in models/, datasets in data/, synthesis in synth/", file=out)
