"""Session fixture: the local two-node Slurm cluster (helpers in slurm_cluster.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests here share slurm_cluster.py; pytest's importlib mode does not put test dirs on sys.path.
sys.path.insert(0, str(Path(__file__).parent))

from slurm_cluster import CLUSTER, STATE_DIR, Cluster, daemon_pids, skip_reason  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "AVR_SLURM_DIR": STATE_DIR}
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True,
                        timeout=600)
    if up.returncode:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    env["SLURM_CONF"] = f"{STATE_DIR}/etc/slurm.conf"
    try:
        yield Cluster(env)
    finally:
        pids = daemon_pids()
        down = subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True,
                              text=True, timeout=180)
        assert down.returncode == 0, down.stderr
        left = [p for p in pids if Path(f"/proc/{p}").exists()]
        assert not left, f"daemons left running after local_cluster.sh down: {left}"
        assert not Path(STATE_DIR).exists()
