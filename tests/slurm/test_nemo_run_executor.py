"""`avr pipeline --executor slurm`'s executor against the local two-node cluster: a stage with
a distributed task (the smoke run across both nodes) and a plain task submitted as parallel
NeMo-Run Slurm jobs, read back as SUCCEEDED with their logs collected; a failing task raises
StageFailed carrying the task's own error."""

import json

import pytest

from avr_megatron.config import load_config
from avr_megatron.launch.slurm import make_executor
from avr_megatron.pipeline.executors import make_executor as registry_executor
from avr_megatron.pipeline.spec import StageFailed, StageSpec, StageTask

from slurm_cluster import REPO

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
RECIPE = str(REPO / "recipes/tiny.yaml")


@pytest.fixture
def executor(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemorun"))
    cfg = load_config(RECIPE, [
        f"run.dir={tmp_path}/pipeline", "launch.slurm.account=avr",
        "launch.slurm.train.nodes=2", "launch.slurm.train.gpus_per_node=0",
        "launch.slurm.train.ntasks_per_node=1", "launch.slurm.train.time=00:10:00",
        "launch.slurm.cpu.time=00:10:00", "launch.slurm.signal_seconds=0",
        f"launch.slurm.env.PYTHONPATH={REPO}", "launch.slurm.env.OMP_NUM_THREADS=1",
        "launch.slurm.env.PYTHONWARNINGS=ignore"])
    ex = make_executor(cfg)
    ex.poll_seconds = 1
    return ex


def test_registered_for_the_pipeline(tmp_path):
    cfg = load_config(RECIPE, [f"run.dir={tmp_path}"])
    assert type(registry_executor("slurm", cfg)).__name__ == "SlurmStageExecutor"


def test_stage_runs_and_succeeds(executor, tmp_path):
    smoke_dir = tmp_path / "smoke"
    spec = StageSpec("smoke", (
        StageTask("train", ("smoke", "--recipe", RECIPE, f"run.dir={smoke_dir}",
                            "train.train_iters=4", "logging.progress_bar=false"),
                  distributed=True),
        StageTask("info", ("info", "--json")),
    ), "train", tmp_path / "logs")
    executor.run_stage(spec)
    summary = json.loads((smoke_dir / "smoke_summary.json").read_text())
    assert summary["layout"]["world_size"] == 2 and summary["iters"] == 4
    train_log = (tmp_path / "logs" / "train.log").read_text()
    assert "smoke: TP=1 PP=1 DP=2" in train_log
    assert "rendezvous 127.0.0.1:" in train_log  # the job's setup lines ran
    info_log = (tmp_path / "logs" / "info.log").read_text()
    assert '"distributed_backend": "gloo"' in info_log
    # NeMo-Run's reading of the jobs' states (sacct through slurmdbd).
    assert executor.states == {"train": "SUCCEEDED", "info": "SUCCEEDED"}


def test_failing_task_raises_stage_failed(executor, tmp_path):
    spec = StageSpec("sft", (
        StageTask("main", ("train", "sft", "--recipe", str(REPO / "recipes/tiny_sft.yaml"),
                           f"run.dir={tmp_path}/sft", f"data.train={tmp_path}/absent.jsonl"),
                  distributed=True),
    ), "train", tmp_path / "logs")
    with pytest.raises(StageFailed) as e:
        executor.run_stage(spec)
    assert e.value.stage == "sft" and e.value.task == "main" and e.value.returncode == 2
    assert "absent.jsonl" in e.value.log_tail and "error" in e.value.log_tail
    assert "absent.jsonl" in (tmp_path / "logs" / "main.log").read_text()
    assert executor.states == {"main": "FAILED"}
