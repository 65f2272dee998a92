"""What a pipeline stage asks an executor to launch, independent of where it runs.

A stage is a list of tasks; each task is one `avr` command line (`argv` after the program
name, always `--recipe <stage config.yaml>` and never relying on the caller's working
directory for outputs). Tasks of one stage are independent (synthesis shards) and may run in
parallel; stages run in order. `distributed` tasks are launched one process per accelerator
(torchrun locally, srun/torchrun across nodes on Slurm); the others are single processes.
`resources` names the executor profile the task needs, so a recipe can give synthesis and
training different partitions, GPU counts or time limits.

Executors (`avr_megatron.pipeline.executors`) turn a StageSpec into processes and raise
StageFailed, with the failing task's log tail, when any task fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RESOURCE_PROFILES = ("synth", "train", "cpu")


@dataclass(frozen=True)
class StageTask:
    # Unique within the stage, file-name safe: "main", "shard-0-of-4", ...
    name: str
    # The `avr` command line after the program name, e.g.
    # ("train", "sft", "--recipe", "/abs/run/stages/rsft/config.yaml").
    argv: tuple[str, ...]
    # One process per accelerator (torchrun / srun) instead of a single process.
    distributed: bool = False
    # Extra environment variables for this task.
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageSpec:
    # Stage name from the pipeline graph, e.g. "rsft", "stage1_trees".
    name: str
    tasks: tuple[StageTask, ...]
    # One of RESOURCE_PROFILES: which executor resource profile (synth | train | cpu).
    resources: str
    # Directory where executors put per-task logs (<log_dir>/<task.name>.log).
    log_dir: Path

    def __post_init__(self) -> None:
        if self.resources not in RESOURCE_PROFILES:
            raise ValueError(f"stage {self.name}: resources={self.resources!r} is not one of "
                             f"{list(RESOURCE_PROFILES)}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"stage {self.name}: task names are not unique: {names}")


class StageFailed(RuntimeError):
    """A task of a stage exited non-zero. The message names the stage, the task, its exit code
    and the tail of its log, so the pipeline can show the cause without the user digging."""

    def __init__(self, stage: str, task: str, returncode: int | None, log_tail: str = "",
                 log_path: Path | None = None):
        self.stage, self.task, self.returncode = stage, task, returncode
        self.log_tail, self.log_path = log_tail, log_path
        where = f" (log: {log_path})" if log_path else ""
        tail = f"\n--- last lines of the log ---\n{log_tail}" if log_tail else ""
        super().__init__(f"stage {stage!r}, task {task!r} failed with exit code {returncode}{where}{tail}")
