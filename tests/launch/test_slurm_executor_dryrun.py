"""The Slurm executor's dry run (no cluster): what each StageTask becomes as an sbatch script,
built by NeMo-Run from launch.slurm; plus the launch.slurm checks that name keys."""

import sys

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.launch.slurm import make_executor, task_layout
from avr_megatron.pipeline.spec import StageSpec, StageTask


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"run.dir={tmp_path}/run", "launch.slurm.account=proj",
                              "launch.slurm.partition=batch", *overrides])


def _stage(tmp_path, resources="train", distributed=True):
    return StageSpec("rsft", (
        StageTask("main", ("train", "sft", "--recipe", "/abs/rsft/config.yaml"),
                  distributed=distributed, env={"AVR_STAGE": "rsft"}),), resources,
        tmp_path / "logs")


def test_training_task_spans_nodes_one_process_per_gpu(tmp_path):
    cfg = _cfg(tmp_path, "launch.slurm.train.nodes=4", "launch.slurm.train.gpus_per_node=8",
               "launch.slurm.train.time=1-00:00:00", "launch.slurm.train.partition=h100",
               "launch.slurm.env.NCCL_DEBUG=WARN")
    text = make_executor(cfg).dryrun(_stage(tmp_path))
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --account=proj", "#SBATCH --partition=h100",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --signal=USR1@300",
                 "#SBATCH --job-name=avr-rsft-main", "export NCCL_DEBUG=WARN",
                 "export AVR_STAGE=rsft", "export MASTER_PORT=", "Run with: sbatch --requeue"):
        assert line in text, line
    assert "4 node(s) x 8 process(es), 8 GPU(s) per node, profile launch.slurm.train" in text
    assert (f"# command: {sys.executable} -m avr_megatron.cli.main train sft --recipe "
            "/abs/rsft/config.yaml") in text
    assert not (tmp_path / "run").exists()  # a dry run writes nothing into the run


def test_synthesis_shards_are_separate_single_process_jobs(tmp_path):
    cfg = _cfg(tmp_path, "launch.slurm.synth.nodes=2", "launch.slurm.synth.gpus_per_node=4")
    spec = StageSpec("synth_stage1", tuple(
        StageTask(f"shard-{i}-of-3", ("synth", "stage1", "--recipe", "/c.yaml", "--shard",
                                      f"{i}/3")) for i in range(3)), "synth", tmp_path / "logs")
    text = make_executor(cfg).dryrun(spec)
    assert text.count("#!/bin/bash") == 3
    for i in range(3):
        assert f"#SBATCH --job-name=avr-synth_stage1-shard-{i}-of-3" in text
    assert text.count("#SBATCH --nodes=1") == 3 and text.count("#SBATCH --gpus-per-node=4") == 3
    assert task_layout(cfg.launch.slurm.synth, spec.tasks[0]).processes == 1


def test_container_flags_go_to_srun(tmp_path):
    cfg = _cfg(tmp_path, "pipeline.envs.train.container_image=/images/avr-train.sqsh",
               "launch.slurm.container_mounts=[/lustre:/lustre]", "launch.slurm.signal_seconds=0")
    text = make_executor(cfg).dryrun(_stage(tmp_path))
    assert "--container-image /images/avr-train.sqsh" in text
    assert "/lustre:/lustre" in text and "--signal" not in text
    assert "# command: avr train sft" in text  # the container's `avr`
    assert "train environment (container /images/avr-train.sqsh)" in text


def test_each_role_runs_in_its_own_environment(tmp_path):
    """pipeline.envs: synthesis in the vLLM image, training in the NGC image; a role without an
    image runs its own Python (here: only synth has an image, train a venv on shared storage)."""
    cfg = _cfg(tmp_path, "pipeline.envs.synth.container_image=/images/avr-synth.sqsh",
               "pipeline.envs.train.python=/shared/venvs/train/bin/python",
               "launch.slurm.container_mounts=[/lustre:/lustre]")
    ex = make_executor(cfg)
    synth = ex.dryrun(_stage(tmp_path, "synth", distributed=False))
    train = ex.dryrun(_stage(tmp_path))
    pairs = ex.dryrun(_stage(tmp_path, "cpu", distributed=False))
    assert "--container-image /images/avr-synth.sqsh" in synth and "/lustre:/lustre" in synth
    assert "# command: avr train sft" in synth
    assert "--container-image" not in train and "/lustre:/lustre" not in train
    assert "# command: /shared/venvs/train/bin/python -m avr_megatron.cli.main train" in train
    assert "--container-image /images/avr-synth.sqsh" in pairs  # pair building: synth env


def test_cpu_profile_and_ntasks(tmp_path):
    cfg = _cfg(tmp_path, "launch.slurm.cpu.ntasks_per_node=2", "launch.slurm.cpu.nodes=2")
    lay = task_layout(cfg.launch.slurm.cpu, _stage(tmp_path, "cpu").tasks[0])
    assert (lay.nodes, lay.ntasks_per_node, lay.gpus_per_node, lay.processes) == (2, 2, 0, 4)
    text = make_executor(cfg).dryrun(_stage(tmp_path, "cpu"))
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text


@pytest.mark.parametrize("overrides,message", [
    (["launch.slurm.tunnel=ssh"], "launch.slurm.tunnel=ssh needs launch.slurm.ssh_host"),
    (["launch.slurm.tunnel=ssh", "launch.slurm.ssh_host=login"],
     "launch.slurm.tunnel=ssh needs launch.slurm.job_dir"),
    (["launch.slurm.tunnel=kube"], "launch.slurm.tunnel='kube' is not one of"),
    (["launch.slurm.ssh_host=login"], "need launch.slurm.tunnel=ssh"),
    (["launch.slurm.train.time=4h"], "launch.slurm.train.time='4h' is not a Slurm time"),
    (["launch.slurm.synth.time=4:00:00"],
     "launch.slurm.synth.time='14400' is a bare number: quote"),
    (["launch.slurm.synth.time=1:2:3:4:5"], "launch.slurm.synth.time="),
    (["launch.slurm.synth.time=1h"], "launch.slurm.synth.time='1h' is not a Slurm time"),
    (["launch.slurm.cpu.nodes=0"], "launch.slurm.cpu.nodes=0 must be >= 1"),
    (["launch.slurm.train.gpus_per_node=-1"], "launch.slurm.train.gpus_per_node=-1"),
    (["launch.slurm.train.ntasks_per_node=0"], "launch.slurm.train.ntasks_per_node=0"),
    (["launch.slurm.signal_seconds=-5"], "launch.slurm.signal_seconds=-5"),
    (["launch.slurm.container_mounts=[/data]", "pipeline.envs.train.container_image=img"],
     "launch.slurm.container_mounts[0]='/data' must be SRC:DST"),
    (["launch.slurm.container_mounts=[/a:/a]"], "launch.slurm.container_mounts need a container "
     "image (pipeline.envs.synth/train.container_image)"),
    (["launch.slurm.tunnel=ssh", "launch.slurm.ssh_host=login", "launch.slurm.job_dir=/j",
      "pipeline.envs.synth.container_image=/s.sqsh"],
     "launch.slurm.tunnel=ssh needs pipeline.envs.train.container_image or "
     "pipeline.envs.train.python"),
    (["pipeline.envs.synth.python=''"], "pipeline.envs.synth.python is empty"),
])
def test_bad_launch_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("value", ["'30:00'", "04:00:00", "'4:00:00'", "2-00", "1-12:00",
                                   "1-00:00:00"])
def test_slurm_time_formats_accepted(value):
    cfg = load_config(None, [f"launch.slurm.train.time={value}"])
    assert cfg.launch.slurm.train.time == value.strip("'")


class _Scripted:
    """Stands in for the cluster: each submission returns the next (state, exit code) per task."""

    def __init__(self, outcomes):
        self.outcomes, self.submitted = list(outcomes), []

    def __call__(self, spec, tasks):
        self.submitted.append([t.name for t in tasks])
        state, code = self.outcomes.pop(0)
        return {t.name: (state, code, f"log of {t.name}\nexit {code}", spec.log_dir / "x.log")
                for t in tasks}


def test_preempted_task_is_resubmitted_then_succeeds(tmp_path, monkeypatch):
    ex = make_executor(_cfg(tmp_path, "launch.slurm.preempt_retries=2"))
    fake = _Scripted([("FAILED", 75), ("FAILED", 75), ("SUCCEEDED", 0)])
    monkeypatch.setattr(ex, "_submit_and_wait", fake)
    ex.run_stage(_stage(tmp_path))
    assert fake.submitted == [["main"]] * 3


def test_preemption_retries_are_bounded_and_other_failures_are_not_retried(tmp_path, monkeypatch):
    from avr_megatron.pipeline.spec import StageFailed

    ex = make_executor(_cfg(tmp_path, "launch.slurm.preempt_retries=1"))
    monkeypatch.setattr(ex, "_submit_and_wait", _Scripted([("FAILED", 75)] * 3))
    with pytest.raises(StageFailed, match="exit code 75"):
        ex.run_stage(_stage(tmp_path))
    fake = _Scripted([("FAILED", 2)])
    monkeypatch.setattr(ex, "_submit_and_wait", fake)
    with pytest.raises(StageFailed) as e:
        ex.run_stage(_stage(tmp_path))
    assert fake.submitted == [["main"]] and e.value.returncode == 2
    assert "log of main" in e.value.log_tail
