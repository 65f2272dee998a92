"""`python -m avr_megatron.launch.plan`: the layout the sbatch scripts print and check."""

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.launch.plan import describe, main


def test_layout_for_world_size(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "parallel.tensor_model_parallel_size=8",
                             "parallel.pipeline_model_parallel_size=4", "model.preset=llama3.1-70b",
                             "train.global_batch_size=32", "train.micro_batch_size=1"])
    text = describe(cfg, 64)
    assert "layout: world=64 TP=8 PP=4 VPP=None CP=1 DP=2" in text
    assert f"run.dir: {tmp_path}" in text and f"checkpoint.dir: {tmp_path}/checkpoints" in text


def test_world_size_must_fit_the_layout():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=8", "model.preset=llama3.1-70b"])
    with pytest.raises(ConfigError, match="world size 12 is not divisible by "
                       "parallel.tensor_model_parallel_size=8"):
        describe(cfg, 12)
    cfg = load_config(None, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="train.global_batch_size=8 is not divisible"):
        describe(cfg, 8)


def test_cli_exit_codes(capsys):
    assert main(["--recipe", "recipes/tiny.yaml", "--world-size", "2"]) == 0
    assert "DP=2" in capsys.readouterr().out
    assert main(["--recipe", "recipes/tiny.yaml", "--world-size", "3",
                 "parallel.tensor_model_parallel_size=2"]) == 2
    assert "not divisible" in capsys.readouterr().err
