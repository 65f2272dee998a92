"""Rules on the eval, pipeline and launch.slurm sections: each bad value is named."""

import pytest

from avr_megatron.config import ConfigError, load_config

SLURM = "pipeline.executor=slurm"
BAD = [
    (["eval.rounds=-1"], "eval.rounds=-1 must be >= 0"),
    (["eval.limit=0"], "eval.limit=0 must be >= 1"),
    (["pipeline.executor=k8s"], "pipeline.executor='k8s' is not one of ['local', 'inline', 'slurm']"),
    (["pipeline.synth_shards=0"], "pipeline.synth_shards=0 must be >= 1"),
    (["pipeline.stages.rsft=5"], "pipeline.stages.rsft must be a mapping"),
    (["launch.slurm.tunnel=ssh"], "launch.slurm.tunnel=ssh needs launch.slurm.ssh_host"),
    (["launch.slurm.tunnel=http"], "launch.slurm.tunnel='http' is not one of"),
    (["launch.slurm.train.nodes=0"], "launch.slurm.train.nodes=0 must be >= 1"),
    (["launch.slurm.synth.gpus_per_node=-1"], "launch.slurm.synth.gpus_per_node=-1 must be >= 0"),
    (["launch.slurm.cpu.ntasks_per_node=0"], "launch.slurm.cpu.ntasks_per_node=0 must be >= 1"),
    (["launch.slurm.train.time=4h"], "launch.slurm.train.time='4h' is not a Slurm time"),
    (["launch.slurm.train.time='1:2:3'"], "launch.slurm.train.time='1:2:3' is not a Slurm time"),
    ([SLURM, "parallel.tensor_model_parallel_size=4", "model.num_attention_heads=12",
      "model.num_query_groups=4", "model.hidden_size=96", "model.ffn_hidden_size=192",
      "launch.slurm.train.gpus_per_node=6"],
     "launch.slurm.train gives 6 processes (1 node(s) x 6 per node) is not divisible by "
     "parallel.tensor_model_parallel_size=4 x parallel.pipeline_model_parallel_size=1 x "
     "parallel.context_parallel_size=1 (TP x PP x CP = 4)"),
    ([SLURM, "train.global_batch_size=12", "train.micro_batch_size=2"],
     "train.global_batch_size=12 is not divisible by train.micro_batch_size=2 x data-parallel size 8"),
    ([SLURM, "synth.policy.backend=vllm", "synth.policy.tensor_parallel_size=4",
      "launch.slurm.synth.gpus_per_node=2"],
     "synth.policy.tensor_parallel_size=4 exceeds launch.slurm.synth.gpus_per_node=2"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_value_names_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


GOOD = [
    ["eval.rounds=0", "pipeline.synth_shards=1", "pipeline.executor=local"],
    ["launch.slurm.train.time=2-00:00:00", "launch.slurm.tunnel=ssh", "launch.slurm.ssh_host=login",
     "launch.slurm.job_dir=/scratch/avr", "pipeline.envs.synth.container_image=/img/synth.sqsh",
     "pipeline.envs.train.python=/shared/venvs/train/bin/python"],
    ["launch.slurm.train.time='100:00:00'", "launch.slurm.synth.time='30:00'",
     "launch.slurm.cpu.time='1-12'"],
    # The world-size checks apply only when the pipeline runs on Slurm.
    ["launch.slurm.train.gpus_per_node=6", "parallel.tensor_model_parallel_size=2"],
    [SLURM, "launch.slurm.train.nodes=2", "train.global_batch_size=32", "train.micro_batch_size=2"],
]


@pytest.mark.parametrize("overrides", GOOD, ids=[o[0] for o in GOOD])
def test_good_values_pass(overrides):
    load_config(None, overrides)
