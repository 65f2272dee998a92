"""Process-group and model-parallel setup from torchrun, Slurm (srun) or a single process.

NCCL on GPU machines, gloo on CPU. `initialize(cfg)` is the one entry point every command that
builds a Megatron model calls; it also activates the CPU compatibility layer when CUDA is absent.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from avr_megatron.config import AvrConfig
from avr_megatron.config.layout import ParallelLayout, layout_for
from avr_megatron.runtime import cpu_compat
from avr_megatron.runtime.device import on_gpu


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback parser for "node[01-04,07],other": take the first name.
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect_launch_env(environ: dict | None = None) -> LaunchEnv:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; `srun python ...` sets SLURM_PROCID/NTASKS."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                           or env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def seed_everything(seed: int) -> None:
    """Python, NumPy, torch and Megatron's model-parallel RNG tracker (per TP rank offsets)."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # On CPU the tracker's CUDA generator is mapped to the CPU one; force_reset lets tests and
    # repeated runs in one process re-seed.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(cfg: AvrConfig, timeout_minutes: int = 30) -> ParallelLayout:
    """Init torch.distributed (once) and Megatron's model-parallel groups for cfg.parallel."""
    from megatron.core import parallel_state

    cpu_compat.activate()
    env = detect_launch_env()
    layout = layout_for(cfg, env.world_size)
    if not dist.is_initialized():
        backend = "nccl" if on_gpu() else "gloo"
        if on_gpu():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(
            backend=backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank, world_size=env.world_size, timeout=timedelta(minutes=timeout_minutes))
    elif dist.get_world_size() != env.world_size:
        layout = layout_for(cfg, dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(cfg.run.seed)
    return layout


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
