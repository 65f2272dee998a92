"""config/layout.py: the one parallel layout rule (world size, DP, micro-batches per step)."""

import pytest

from avr_megatron.config import ConfigError, load_config
from avr_megatron.config.layout import (ParallelLayout, batch_error, layout_for,
                                        microbatch_errors, microbatches_per_step,
                                        model_parallel_size, world_error)

TP, PP, CP, VPP = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
                   "parallel.context_parallel_size", "parallel.virtual_pipeline_model_parallel_size")


def _cfg(*overrides):
    return load_config(None, ["model.preset=llama3.1-8b", *overrides])


@pytest.mark.parametrize("tp,pp,cp,world,dp", [(1, 1, 1, 1, 1), (2, 1, 1, 8, 4), (4, 2, 1, 32, 4),
                                               (2, 2, 2, 8, 1), (8, 4, 1, 64, 2)])
def test_data_parallel_size_is_what_the_model_leaves(tp, pp, cp, world, dp):
    cfg = _cfg(f"{TP}={tp}", f"{PP}={pp}", f"{CP}={cp}")
    assert model_parallel_size(cfg.parallel) == tp * pp * cp
    assert layout_for(cfg, world) == ParallelLayout(tp, pp, None, cp, dp, world)


@pytest.mark.parametrize("world", [0, 4, 12, 31])
def test_world_must_be_a_multiple_of_tp_pp_cp(world):
    cfg = _cfg(f"{TP}=8", f"{PP}=2")
    msg = world_error(cfg.parallel, world)
    assert msg == (f"world size {world} is not divisible by {TP}=8 x {PP}=2 x {CP}=1 "
                   "(TP x PP x CP = 16)")
    with pytest.raises(ConfigError, match=rf"world size {world} is not divisible"):
        layout_for(cfg, world)
    assert world_error(cfg.parallel, 6, "launch.slurm.train gives 6 processes").startswith(
        "launch.slurm.train gives 6 processes is not divisible by")


@pytest.mark.parametrize("gbs,mbs,dp,n", [(8, 1, 1, 8), (8, 2, 2, 2), (12, 3, 4, 1),
                                          (64, 1, 8, 8)])
def test_microbatches_per_step(gbs, mbs, dp, n):
    cfg = _cfg(f"train.global_batch_size={gbs}", f"train.micro_batch_size={mbs}")
    assert batch_error(cfg.train, dp) is None and microbatch_errors(cfg, dp) == []
    assert microbatches_per_step(cfg, dp) == n


def test_global_batch_must_split_over_micro_batch_and_dp():
    cfg = _cfg("train.global_batch_size=12", "train.micro_batch_size=2")
    assert batch_error(cfg.train) is None  # without DP: 12 / 2
    assert batch_error(cfg.train, 4) == ("train.global_batch_size=12 is not divisible by "
                                         "train.micro_batch_size=2 x data-parallel size 4")
    assert batch_error(cfg.train, 4, " (from X)").endswith("data-parallel size 4 (from X)")
    with pytest.raises(ConfigError, match="data-parallel size 4$"):
        microbatches_per_step(cfg, 4)
    assert batch_error(_cfg("train.global_batch_size=3").train) is None  # micro_batch_size=1


def test_interleaving_needs_a_multiple_of_pp_microbatches():
    cfg = load_config(None, ["model.num_layers=4", f"{PP}=2", f"{VPP}=2",
                             "train.global_batch_size=6", "train.micro_batch_size=1"])
    assert microbatches_per_step(cfg, 1) == 6
    assert microbatch_errors(cfg, 3) == []  # 2 per rank
    (msg,) = microbatch_errors(cfg, 2)
    assert "data-parallel size 2) = 3, to be a multiple of" in msg
    with pytest.raises(ConfigError, match="interleaved pipelining"):
        microbatches_per_step(cfg, 2)
