"""Executors that run stages on this machine.

`local` (the default) runs every task as a NeMo-Run `Script` on its LocalExecutor, one
Experiment per stage (records under <run.dir>/nemo_run); `inline` runs the same command lines
as plain subprocesses, for environments without NeMo-Run. Both write each task's output to
<stage>/logs/<task>.log, run the tasks of a stage in parallel, and raise StageFailed with the
log tail when one fails. Distributed tasks with more than one rank go through torchrun with
TP x PP x CP processes (one model replica on this machine; 1 on the CPU recipes).
Each stage runs with its role's interpreter (pipeline.envs.<role>.python: synthesis, pairs and
evaluation in the synth environment, training and log-probs in the train environment).
Each task records the process group it runs in, so an interrupted pipeline (SIGINT/SIGTERM)
stops them, and a rerun after a hard kill stops leftovers before starting the stage again.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from avr_megatron.config.layout import model_parallel_size
from avr_megatron.launch.roles import role_of, role_python
from avr_megatron.pipeline.spec import StageFailed, StageSpec, StageTask


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def task_command(task: StageTask, nproc: int, python: list[str] | None = None) -> list[str]:
    """The process command line of a task: torchrun for distributed tasks with more than one
    process, the avr CLI module otherwise; `python` is the stage's role environment
    (pipeline.envs.<role>.python, default: the pipeline's own interpreter)."""
    python = python or [sys.executable]
    if task.distributed and nproc > 1:
        return [*python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", "-m", "avr_megatron.cli.main", *task.argv]
    return [*python, "-m", "avr_megatron.cli.main", *task.argv]


def task_script(task: StageTask, spec: StageSpec, nproc: int, workdir: str,
                python: list[str] | None = None) -> str:
    """Bash that runs the task in its own process group, logging to <log_dir>/<task>.log and
    leaving its exit code in <task>.rc and its process group in <task>.pid."""
    log = spec.log_dir / f"{task.name}.log"
    rc = spec.log_dir / f"{task.name}.rc"
    pid = spec.log_dir / f"{task.name}.pid"
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in task.env.items())
    cmd = shlex.join(task_command(task, nproc, python))
    return (f"cd {shlex.quote(workdir)}\n"
            f"rm -f {shlex.quote(str(rc))}\n"
            f"setsid env {env} {cmd} > {shlex.quote(str(log))} 2>&1 &\n"
            f"child=$!\necho $child > {shlex.quote(str(pid))}\n"
            f"trap 'kill -TERM -- -$child 2>/dev/null' TERM INT\n"
            f"wait $child; code=$?\n"
            f"while kill -0 $child 2>/dev/null; do wait $child; code=$?; done\n"
            f"echo $code > {shlex.quote(str(rc))}\nexit $code\n")


def stop_leftovers(log_dir: Path) -> None:
    """Stop the process groups a killed pipeline left running in this stage."""
    for pid_file in log_dir.glob("*.pid"):
        try:
            pgid = int(pid_file.read_text().strip())
            os.killpg(pgid, signal.SIGTERM)
            for _ in range(50):
                os.killpg(pgid, 0)
                time.sleep(0.2)
            os.killpg(pgid, signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError, OSError):
            pass
        pid_file.unlink(missing_ok=True)


def _check(spec: StageSpec) -> None:
    for task in spec.tasks:
        rc_file = spec.log_dir / f"{task.name}.rc"
        code = int(rc_file.read_text().strip()) if rc_file.exists() else None
        if code != 0:
            log = spec.log_dir / f"{task.name}.log"
            raise StageFailed(spec.name, task.name, code, log_tail(log), log)


class _Base:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.workdir = os.getcwd()

    def nproc(self, task: StageTask) -> int:
        # One model copy (DP=1): the smallest world config/layout.py's rule accepts.
        return max(1, model_parallel_size(self.cfg.parallel)) if task.distributed else 1

    def python(self, spec: StageSpec) -> list[str]:
        """The interpreter of the stage's role environment (pipeline.envs.<role>.python)."""
        return role_python(self.cfg, role_of(spec.resources))

    def script(self, task: StageTask, spec: StageSpec) -> str:
        return task_script(task, spec, self.nproc(task), self.workdir, self.python(spec))

    def dryrun(self, spec: StageSpec) -> str:
        return "\n".join(f"# {spec.name}/{t.name} ({role_of(spec.resources)} environment): "
                         f"{shlex.join(task_command(t, self.nproc(t), self.python(spec)))}"
                         for t in spec.tasks)


class InlineExecutor(_Base):
    """Plain subprocesses, no NeMo-Run."""

    def run_stage(self, spec: StageSpec) -> None:
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        stop_leftovers(spec.log_dir)
        procs = [subprocess.Popen(["bash", "-c", self.script(t, spec)], stdin=subprocess.DEVNULL)
                 for t in spec.tasks]
        try:
            for p in procs:
                p.wait()
        except BaseException:
            stop_leftovers(spec.log_dir)
            raise
        _check(spec)


class NemoRunLocalExecutor(_Base):
    """Every task of a stage as a NeMo-Run Script on a LocalExecutor, in one Experiment."""

    def run_stage(self, spec: StageSpec) -> None:
        import nemo_run as run

        spec.log_dir.mkdir(parents=True, exist_ok=True)
        stop_leftovers(spec.log_dir)
        base = Path(self.cfg.run.dir).resolve() / "nemo_run"
        stdin = sys.stdin
        try:
            with open(os.devnull) as sys.stdin, run.Experiment(
                    f"avr-{spec.name}", base_dir=str(base), log_level="WARN",
                    enable_goodbye_message=False, skip_status_at_exit=True) as exp:
                for t in spec.tasks:
                    # The script itself is one process; torchrun (inside it) spawns the ranks.
                    exp.add(run.Script(inline=self.script(t, spec)),
                            executor=run.LocalExecutor(ntasks_per_node=1), name=t.name)
                exp.run(detach=False, tail_logs=False)
        except BaseException:
            stop_leftovers(spec.log_dir)
            raise
        finally:
            sys.stdin = stdin
        _check(spec)


def make_local(cfg: Any) -> NemoRunLocalExecutor:
    return NemoRunLocalExecutor(cfg)


def make_inline(cfg: Any) -> InlineExecutor:
    return InlineExecutor(cfg)
