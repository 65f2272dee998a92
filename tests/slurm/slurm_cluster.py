"""Helpers for tests on the local two-node Slurm cluster (slurm/local_cluster.sh): submit, wait
for jobs. Tests that need the cluster take the session fixture `cluster` (conftest.py), which
brings it up once and down (no daemon left) at the end."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = "/tmp/avr-slurm-tests"


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (daemons run as root, packages via apt)"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "Slurm is not installed and apt-get is unavailable to install it"
    return None


def daemon_pids() -> list[int]:
    """slurmctld, both slurmd, slurmdbd and MariaDB of the test cluster, from their pid files."""
    files = ["slurmctld.pid", "slurmd-n1.pid", "slurmd-n2.pid", "slurmdbd.pid", "db/mariadbd.pid"]
    return [int(p.read_text()) for p in (Path(STATE_DIR) / f for f in files) if p.is_file()]


class Cluster:
    def __init__(self, env: dict):
        self.env = env

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, timeout: float = 60):
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, check=check, timeout=timeout, cwd=REPO)

    def job(self, job_id: str) -> dict:
        """scontrol's view of a job as key -> value (JobState, ExitCode, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float = 240) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                    "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
                return info
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}")


def avr_python() -> str:
    """AVR_PYTHON for the sbatch scripts: this interpreter with the repository importable."""
    return f"env PYTHONPATH={REPO} OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore {sys.executable}"
