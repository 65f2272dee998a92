"""`avr pipeline --executor slurm`: each stage runs as NeMo-Run Slurm jobs built from launch.slurm.

One Slurm job per StageTask, all tasks of a stage submitted together (synthesis shards run in
parallel), and `run_stage` blocks until every job ends. A `distributed` task (training) gets the
nodes of its resource profile and one process per GPU through `srun`; the processes find each
other from Slurm's variables (avr_megatron/runtime/distributed.py reads SLURM_PROCID/NTASKS,
MASTER_ADDR/MASTER_PORT come from the job's setup lines below). Other tasks are one process on
one node. A task that ends with exit code 75 (preempted: checkpoint saved) is submitted again up
to launch.slurm.preempt_retries times and resumes from its checkpoint. Failure raises
StageFailed with the tail of the job's log, which is also copied to <spec.log_dir>/<task>.log.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avr_megatron.launch.roles import role_of
from avr_megatron.pipeline.spec import StageFailed, StageSpec, StageTask

EXIT_PREEMPTED = 75  # avr_megatron.training.signals.EXIT_PREEMPTED (not imported: it pulls torch)

# Lines of the sbatch script, before srun: rank 0's address and a port for torch.distributed.
# The first node's NodeAddr (not its name: node names need not resolve, e.g. on the local test
# cluster) and a port from the job id and restart count, so a requeued job does not meet its
# previous incarnation's socket.
RENDEZVOUS_SETUP = r"""
avr_first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$avr_first_node" -o 2>/dev/null \
  | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$avr_first_node}
export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 4 + ${SLURM_RESTART_COUNT:-0} % 4) % 20000 ))
echo "avr: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"
""".strip()


@dataclass(frozen=True)
class TaskLayout:
    """How one StageTask is placed: nodes, processes per node, GPUs per node."""

    nodes: int
    ntasks_per_node: int
    gpus_per_node: int

    @property
    def processes(self) -> int:
        return self.nodes * self.ntasks_per_node


def task_layout(profile: Any, task: StageTask) -> TaskLayout:
    gpus = profile.gpus_per_node or 0
    if not task.distributed:
        return TaskLayout(1, 1, gpus)
    per_node = profile.ntasks_per_node or gpus or 1
    return TaskLayout(profile.nodes, per_node, gpus)


class SlurmStageExecutor:
    """Runs StageSpecs as NeMo-Run SlurmExecutor jobs (see the module docstring)."""

    def __init__(self, cfg: Any, poll_seconds: float = 5.0):
        self.cfg = cfg
        self.s = cfg.launch.slurm
        self.poll_seconds = poll_seconds
        self.workdir = os.getcwd()
        # NeMo-Run's final state of each task of the last stage run (SUCCEEDED, FAILED, ...).
        self.states: dict[str, str] = {}

    # -- building blocks ------------------------------------------------------------------
    def local_dir(self) -> str:
        """NeMo-Run's experiment records on this machine."""
        if self.s.job_dir and self.s.tunnel == "local":
            return os.path.abspath(self.s.job_dir)
        return os.path.abspath(os.path.join(self.cfg.run.dir, "slurm"))

    def job_dir(self) -> str:
        """Where job files go on the cluster (NeMo-Run adds <experiment>/<id>/<task>)."""
        if self.s.tunnel == "ssh":
            return self.s.job_dir
        return os.path.join(self.local_dir(), "experiments")

    def env(self, spec: StageSpec):
        """pipeline.envs.<role> of the stage: its Python and container image."""
        return getattr(self.cfg.pipeline.envs, role_of(spec.resources))

    def avr_command(self, spec: StageSpec) -> list[str]:
        """How a task starts `avr` on the nodes: the role's Python when set, `avr` in its
        container, else this interpreter (a shared file system: launch.slurm.tunnel=local)."""
        env = self.env(spec)
        if env.python:
            return [*shlex.split(env.python), "-m", "avr_megatron.cli.main"]
        if env.container_image:
            return ["avr"]
        return [sys.executable, "-m", "avr_megatron.cli.main"]

    def tunnel(self):
        import nemo_run as run

        if self.s.tunnel == "ssh":
            user = self.s.ssh_user or os.environ.get("USER", "")
            return run.SSHTunnel(host=self.s.ssh_host, user=user, job_dir=self.job_dir(),
                                 identity=self.s.ssh_identity)
        return run.LocalTunnel(job_dir=self.job_dir())

    def executor(self, spec: StageSpec, task: StageTask):
        import nemo_run as run

        profile = getattr(self.s, spec.resources)
        lay = task_layout(profile, task)
        env = {**{k: str(v) for k, v in self.s.env.items()}, **task.env}
        return run.SlurmExecutor(
            account=self.s.account,  # None: no --account line
            partition=profile.partition or self.s.partition,
            job_name_prefix=f"avr-{spec.name}-",
            nodes=lay.nodes,
            ntasks_per_node=lay.ntasks_per_node,
            gpus_per_node=lay.gpus_per_node or None,
            cpus_per_task=profile.cpus_per_task,
            mem=profile.mem,
            time=profile.time,
            signal=(f"USR1@{self.s.signal_seconds}" if self.s.signal_seconds else None),
            container_image=self.env(spec).container_image,
            container_mounts=list(self.s.container_mounts) if self.env(spec).container_image
            else [],
            env_vars=env,
            setup_lines=RENDEZVOUS_SETUP,
            tunnel=self.tunnel(),
            packager=run.Packager(),
        )

    def script(self, spec: StageSpec, task: StageTask):
        import nemo_run as run

        cmd = shlex.join([*self.avr_command(spec), *task.argv])
        # Outside a container the task runs where the pipeline was started, so relative paths in
        # a recipe mean the same on the cluster as on the login node (shared file system).
        cd = (f"cd {shlex.quote(self.workdir)}\n"
              if not self.env(spec).container_image and self.s.tunnel == "local" else "")
        return run.Script(inline=f"{cd}exec {cmd}\n")

    def _experiment(self, spec: StageSpec):
        import nemo_run as run

        exp = run.Experiment(f"avr-{spec.name}", base_dir=self.local_dir(), log_level="WARN",
                             enable_goodbye_message=False, skip_status_at_exit=True)
        return exp

    # -- the executor interface -----------------------------------------------------------
    def dryrun(self, spec: StageSpec) -> str:
        """The sbatch script of every task, without touching a cluster."""
        parts = []
        scratch = tempfile.mkdtemp(prefix="avr-slurm-dryrun-")  # NeMo-Run writes the task script
        try:
            for task in spec.tasks:
                parts.append(self._dryrun_task(spec, task, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return "\n\n".join(parts)

    def _dryrun_task(self, spec: StageSpec, task: StageTask, scratch: str) -> str:
        import nemo_run as run
        from nemo_run.core.execution.slurm import SlurmBatchRequest
        from nemo_run.run.torchx_backend.packaging import package

        ex = self.executor(spec, task)
        ex.tunnel = run.LocalTunnel(job_dir=scratch)
        lay = task_layout(getattr(self.s, spec.resources), task)
        ex.job_name = task.name
        ex.experiment_id = f"dryrun-{spec.name}"
        ex.job_dir = os.path.join(scratch, task.name)
        app = package(task.name, self.script(spec, task), ex, serialize_to_file=False)
        role = app.roles[0]
        req = SlurmBatchRequest(launch_cmd=["sbatch", "--requeue", "--parsable"],
                                jobs=[task.name],
                                command_groups=[[" ".join([role.entrypoint, *role.args])]],
                                executor=ex, max_retries=0, extra_env=dict(role.env))
        env = self.env(spec)
        where = (f"container {env.container_image}" if env.container_image
                 else f"Python {shlex.join(self.avr_command(spec)[:-2])}")
        return (
            f"# stage {spec.name}, task {task.name}: {lay.nodes} node(s) x "
            f"{lay.ntasks_per_node} process(es), {lay.gpus_per_node} GPU(s) per node, "
            f"profile launch.slurm.{spec.resources}, {role_of(spec.resources)} environment "
            f"({where})\n"
            f"# command: {shlex.join([*self.avr_command(spec), *task.argv])}\n"
            + req.materialize())

    def run_stage(self, spec: StageSpec) -> None:
        # NeMo-Run's shell commands (through invoke) would read our stdin: they need no input,
        # and must not eat a terminal's keystrokes or trip over a closed/captured stdin.
        stdin = sys.stdin
        try:
            with open(os.devnull) as sys.stdin:
                self._run_stage(spec)
        finally:
            sys.stdin = stdin

    def _run_stage(self, spec: StageSpec) -> None:
        self.states = {}
        pending = list(spec.tasks)
        attempts = {t.name: 0 for t in spec.tasks}
        while pending:
            results = self._submit_and_wait(spec, pending)
            retry = []
            for task in pending:
                state, code, log_text, log_path = results[task.name]
                if state == "SUCCEEDED":
                    continue
                if code == EXIT_PREEMPTED and attempts[task.name] < self.s.preempt_retries:
                    attempts[task.name] += 1
                    retry.append(task)
                    continue
                tail = "\n".join(log_text.splitlines()[-40:])
                raise StageFailed(spec.name, task.name, code, tail, log_path)
            pending = retry

    def _submit_and_wait(self, spec: StageSpec, tasks: list[StageTask]) -> dict:
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        with self._experiment(spec) as exp:
            for task in tasks:
                exp.add(self.script(spec, task), executor=self.executor(spec, task),
                        name=task.name)
            exp.run(detach=True)
            jobs = {job.id: job for job in exp.jobs}
            app_ids = {}
            for name, job in jobs.items():
                _, _, path = job.handle.partition("://")
                app_ids[name] = path.split("/")[1]
            runner = exp._runner
            out = {}
            for task in tasks:
                job = jobs[task.name]
                try:
                    state = self._wait(job, runner)
                except BaseException:  # Ctrl-C, or anything else: leave no job running behind
                    job.executor.tunnel.run(f"scancel {' '.join(app_ids.values())}", hide=True,
                                            warn=True)
                    raise
                log_text = self._collect_log(job.executor, app_ids[task.name])
                code = _first_task_exit(log_text) or self._exit_code(job.executor,
                                                                     app_ids[task.name])
                log_path = spec.log_dir / f"{task.name}.log"
                log_path.write_text(log_text)
                if state == "SUCCEEDED" and code not in (0, None):
                    state = "FAILED"
                out[task.name] = (state, code, log_text, log_path)
                self.states[task.name] = state
        return out

    def _wait(self, job, runner) -> str:
        from torchx.specs import AppState

        terminal = {AppState.SUCCEEDED, AppState.FAILED, AppState.CANCELLED}
        unknown_since = None
        while True:
            state = job.status(runner=runner)
            if state in terminal:
                return state.name
            if state == AppState.UNKNOWN:
                unknown_since = unknown_since or time.time()
                if time.time() - unknown_since > 600:
                    return "UNKNOWN"
            else:
                unknown_since = None
            time.sleep(self.poll_seconds)

    def _exit_code(self, executor, app_id: str) -> int | None:
        """The batch script's exit code from sacct ("75:0" -> 75)."""
        try:
            res = executor.tunnel.run(f"sacct -n -X -P -j {app_id} -o ExitCode,State", hide=True,
                                      warn=True)
            first = res.stdout.strip().splitlines()[0]
            code, _, sig = first.split("|")[0].partition(":")
            return int(code) if int(code) or not int(sig or 0) else 128 + int(sig)
        except Exception:  # accounting unavailable: the state alone decides
            return None

    def _collect_log(self, executor, app_id: str) -> str:
        """The srun output NeMo-Run wrote for the job (all restarts) plus the sbatch log."""
        folder = executor.job_details.folder
        # The batch script's trace first, the task's own output (one file per restart) last,
        # so that the tail of the collected log is the tail of the task.
        cmd = (f"cd {shlex.quote(folder)} && for f in sbatch_*_{app_id}.out "
               f"$(ls -tr log-*_{app_id}_*.out 2>/dev/null); do [ -f \"$f\" ] && "
               f"{{ echo \"==> $f <==\"; cat \"$f\"; }}; done; true")
        try:
            return executor.tunnel.run(cmd, hide=True, warn=True).stdout
        except Exception as e:  # the job ran; only its log is out of reach
            return f"(log of job {app_id} could not be read from {folder}: {e})"


def make_executor(cfg: Any) -> SlurmStageExecutor:
    return SlurmStageExecutor(cfg)


_TASK_EXIT = re.compile(r"srun: error: \S+: tasks? [\d,-]+: Exited with exit code (\d+)")


def _first_task_exit(log_text: str) -> int | None:
    """The exit code of the first task that failed, as srun reports it. With several processes
    the job's own code is often the signal that ended the others (--kill-on-bad-exit); the
    first failure is the cause."""
    m = _TASK_EXIT.search(log_text)
    return int(m.group(1)) if m else None
