"""The parallel layout rule, written once (no torch import): TP x PP x CP divides the world
size, the data-parallel size is what is left, and the global batch divides into micro-batches
of `train.micro_batch_size` on each of the DP ranks (under interleaved pipelining, a multiple
of PP of them).

Validation (with launch.slurm.train's world size), the launch plan, the local executor (how
many processes a distributed stage starts), torch.distributed's set-up and the training loop
all ask these functions, so they agree and their errors read alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from avr_megatron.config.errors import ConfigError
from avr_megatron.config.schema import AvrConfig, ParallelConfig, TrainConfig


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pp: int
    vpp: int | None
    cp: int
    dp: int
    world_size: int


def model_parallel_size(p: ParallelConfig) -> int:
    """TP x PP x CP: the processes that hold one copy of the model (a run's smallest world)."""
    return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size


def world_error(p: ParallelConfig, world_size: int, world: str | None = None) -> str | None:
    """Why `world_size` processes cannot run this layout, or None. `world` says where the
    number comes from (default "world size N")."""
    mp = model_parallel_size(p)
    if mp >= 1 and world_size >= 1 and world_size % mp == 0:
        return None
    return (f"{world or f'world size {world_size}'} is not divisible by "
            f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size} x "
            f"parallel.pipeline_model_parallel_size={p.pipeline_model_parallel_size} x "
            f"parallel.context_parallel_size={p.context_parallel_size} (TP x PP x CP = {mp})")


def batch_error(t: TrainConfig, dp: int | None = None, where: str = "") -> str | None:
    """Why the global batch does not split into micro-batches on `dp` data-parallel ranks
    (dp=None: the rule without the data-parallel size, which is known only with a world size),
    or None. `where` is appended to the message (where dp came from)."""
    per_step = t.micro_batch_size * (dp or 1)
    if per_step >= 1 and t.global_batch_size % per_step == 0:
        return None
    dp_text = "" if dp is None else f" x data-parallel size {dp}"
    return (f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}{dp_text}{where}")


def interleaving_error(cfg: AvrConfig, dp: int) -> str | None:
    """Megatron's interleaved schedule needs the microbatches of a step (per data-parallel
    rank) to be a multiple of the pipeline size (and so at least it). Assumes batch_error is
    None for this dp."""
    p, t = cfg.parallel, cfg.train
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    n = t.global_batch_size // (t.micro_batch_size * dp)
    if vpp is None or pp < 2 or n % pp == 0:
        return None
    return (f"interleaved pipelining (parallel.virtual_pipeline_model_parallel_size={vpp}) "
            f"needs the microbatches per step, train.global_batch_size / (train.micro_batch_size "
            f"x data-parallel size {dp}) = {n}, to be a multiple of "
            f"parallel.pipeline_model_parallel_size={pp}")


def microbatch_errors(cfg: AvrConfig, dp: int, where: str = "") -> list[str]:
    """The batch rule for `dp` data-parallel ranks: divisibility, then interleaving."""
    err = batch_error(cfg.train, dp, where)
    if err is None:
        err = interleaving_error(cfg, dp)
    return [err] if err else []


def layout_for(cfg: AvrConfig, world_size: int) -> ParallelLayout:
    """The layout of `world_size` processes (the world rule only: commands that do not step
    an optimizer, such as reference log-probs, do not need the global batch to split)."""
    err = world_error(cfg.parallel, world_size)
    if err:
        raise ConfigError(err)
    p = cfg.parallel
    return ParallelLayout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                          p.virtual_pipeline_model_parallel_size, p.context_parallel_size,
                          world_size // model_parallel_size(p), world_size)


def microbatches_per_step(cfg: AvrConfig, dp: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step; ConfigError when the
    global batch does not split (or does not suit interleaving)."""
    errors = microbatch_errors(cfg, dp)
    if errors:
        raise ConfigError(errors[0])
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
