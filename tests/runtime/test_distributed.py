import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.config.layout import layout_for
from avr_megatron.runtime.distributed import detect_launch_env


def test_torchrun_env():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                             "MASTER_ADDR": "node1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "node1", 1234, "torchrun")


def test_slurm_srun_env():
    env = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242",
                             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")
    assert env.master_addr == "gpu07" and env.master_port == 20000 + 4242


def test_slurm_batch_shell_is_single_process():
    # Inside an sbatch script (no srun step) a python process is one rank, not SLURM_NTASKS.
    env = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "1"})
    assert env.launcher == "single" and env.world_size == 1


def test_layout():
    cfg = load_config(None, ["model.preset=llama3.1-8b", "parallel.tensor_model_parallel_size=4",
                             "parallel.pipeline_model_parallel_size=2"])
    assert layout_for(cfg, 32).dp == 4
    with pytest.raises(ConfigError, match="world size 12 is not divisible"):
        layout_for(cfg, 12)
