"""Executor registry: a name from `pipeline.executor` (or `--executor`) -> a factory.

A factory takes the resolved AvrConfig and returns an object with
`run_stage(spec: StageSpec) -> None` (raising StageFailed on failure) and an optional
`dryrun(spec: StageSpec) -> str` (what would be launched, as text). The pipeline only ever
talks to this interface; the Slurm executor lives in avr_megatron.launch and registers itself
here, so the pipeline does not import it unless it is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

from avr_megatron.pipeline.spec import StageSpec


class Executor(Protocol):
    def run_stage(self, spec: StageSpec) -> None: ...


# name -> "module:function" (imported on use, so `avr --help` stays light).
EXECUTORS: dict[str, str] = {
    "local": "avr_megatron.pipeline.local:make_local",
    "inline": "avr_megatron.pipeline.local:make_inline",
    "slurm": "avr_megatron.launch.slurm:make_executor",
}


def register_executor(name: str, factory: str) -> None:
    EXECUTORS[name] = factory


def make_executor(name: str, cfg: Any) -> Executor:
    if name not in EXECUTORS:
        raise KeyError(f"unknown executor {name!r}; known: {sorted(EXECUTORS)}")
    module, _, fn = EXECUTORS[name].partition(":")
    factory: Callable[[Any], Executor] = getattr(importlib.import_module(module), fn)
    return factory(cfg)
