"""`sbatch slurm/avr_70b.sh` on the local two-node cluster, with the tiny SFT recipe on CPU
(gloo, one process per node): the two-node run reproduces the one-node run's losses; a job
told to checkpoint (USR1 to the batch shell, as `--signal=B:USR1@...` does) requeues itself
and resumes to the same final loss; a failing stage fails the job with the error in its log."""

import json
import time
from pathlib import Path

import pytest

from avr_megatron.testing.tiny_hf import train_tiny_tokenizer
from avr_megatron.testing.toy_data import sft_records, write_jsonl

from slurm_cluster import REPO, avr_python

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ITERS = 30
# CPU settings for the local cluster: the script's GPU/CPU/memory headers are overridden.
# --exclusive=user lets this user's test jobs share the two nodes (the header asks --exclusive).
CPU_FLAGS = ["--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--ntasks-per-node=1",
             "--exclusive=user"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    write_jsonl(sft_records(48, seed=0), d / "sft.jsonl")
    train_tiny_tokenizer(d / "tokenizer")
    return d


def _submit(cluster, run_dir: Path, toy: Path, nodes: int, *overrides: str, **env) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", f"--nodes={nodes}", *CPU_FLAGS,
           f"--output={run_dir}/slurm-%j.out", "slurm/avr_70b.sh",
           f"run.dir={run_dir}", f"data.train={toy / 'sft.jsonl'}",
           f"data.tokenizer={toy / 'tokenizer'}", f"train.train_iters={ITERS}",
           "checkpoint.save_interval=0", "logging.progress_bar=false", *overrides]
    env = {"AVR_PYTHON": avr_python(), "AVR_RECIPE": str(REPO / "recipes/tiny_sft.yaml"),
           "STAGE": "sft", **env}
    return cluster.run(*cmd, env=env).stdout.strip().split(";")[0]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "train_summary.json").read_text())


def _job_log(run_dir: Path, job: str) -> str:
    return (run_dir / f"slurm-{job}.out").read_text()


@pytest.fixture(scope="module")
def baseline(cluster, toy, tmp_path_factory):
    """The same SFT run on two nodes and on one node."""
    root = tmp_path_factory.mktemp("baseline")
    jobs = {nodes: (root / f"nodes{nodes}", _submit(cluster, root / f"nodes{nodes}", toy, nodes))
            for nodes in (2, 1)}  # both at once
    out = {}
    for nodes, (run_dir, job) in jobs.items():
        info = cluster.wait(job)
        assert info["JobState"] == "COMPLETED", _job_log(run_dir, job)
        out[nodes] = (run_dir, job, info)
    return out


def test_two_nodes_match_one_node(baseline):
    (two, job, info), (one, _, _) = baseline[2], baseline[1]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    s2, s1 = _summary(two), _summary(one)
    assert s2["layout"]["world_size"] == 2 and s2["layout"]["dp"] == 2
    assert s1["layout"]["world_size"] == 1
    assert s2["status"] == s1["status"] == "finished" and s2["iteration"] == ITERS
    l2 = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    l1 = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert len(l2) == len(l1) == ITERS
    assert l2 == pytest.approx(l1, rel=1e-5, abs=1e-6)
    assert l2[-1] < l2[0] - 0.5  # it learned something
    # Logs per stage and rank, and the plan in the job log.
    assert (two / "logs" / f"sft.{job}.rank0.log").is_file()
    assert (two / "logs" / f"sft.{job}.rank1.log").is_file()
    assert "TP=1 PP=1 VPP=None CP=1 DP=2" in _job_log(two, job)


def _wait_for(what, predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _last_iteration(metrics: Path) -> int:
    rows = metrics.read_text().splitlines() if metrics.is_file() else []
    return json.loads(rows[-1])["iteration"] if rows else 0


def test_signal_and_requeue_resume_to_the_same_loss(cluster, toy, baseline, tmp_path):
    """Two interruptions of one job: USR1 to the batch shell (what `--signal=B:USR1@600` does
    before the time limit) -> checkpoint, exit 75, the job requeues itself; then `scontrol
    requeue` (an admin, a node failure) -> Slurm kills and restarts it. Each restart resumes
    from the newest checkpoint, and the run ends at the uninterrupted run's loss."""
    run_dir = tmp_path / "requeue"
    metrics = run_dir / "metrics.jsonl"
    job = _submit(cluster, run_dir, toy, 2, "checkpoint.save_interval=5")
    _wait_for("training to start", lambda: _last_iteration(metrics) >= 3)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    _wait_for("the first requeue", lambda: cluster.job(job)["Restarts"] == "1", timeout=180)
    first_stop = json.loads((run_dir / "train_summary.json").read_text())["iteration"]
    _wait_for("the resumed run to pass a periodic checkpoint",
              lambda: _last_iteration(metrics) >= first_stop + 6, timeout=180)
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait(job, timeout=300)
    log = _job_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", log
    assert log.count("checkpoint saved (exit 75): requeueing") >= 1
    assert "restart 1," in log and "restart 2," in log
    s = _summary(run_dir)
    assert s["status"] == "finished" and s["iteration"] == ITERS
    assert first_stop < s["started_at_iteration"] < ITERS, log  # resumed, not restarted
    two = _summary(baseline[2][0])
    assert s["last"]["loss"] == pytest.approx(two["last"]["loss"], rel=1e-5, abs=1e-6)


def test_failing_stage_fails_the_job(cluster, toy, tmp_path):
    run_dir = tmp_path / "bad"
    job = _submit(cluster, run_dir, toy, 2, f"data.train={tmp_path}/missing.jsonl")
    info = cluster.wait(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    log = _job_log(run_dir, job)
    assert "stage sft failed with exit code 2" in log
    rank0 = (run_dir / "logs" / f"sft.{job}.rank0.log").read_text()
    assert "missing.jsonl" in rank0 and "error" in rank0
