"""The one place that decides where this process computes: its CUDA device when there is one
(`runtime.initialize` selects it from LOCAL_RANK), else the CPU. Everything that creates or
moves a tensor for the model (batches, metrics, collective buffers) asks here, so no module
guesses on its own and a CPU-only path cannot slip into a GPU run."""

from __future__ import annotations

import torch


def on_gpu() -> bool:
    """True when this process computes on a CUDA device (NCCL, fused kernels, TE)."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """This process's compute device."""
    if on_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(tensor: torch.Tensor, non_blocking: bool = True) -> torch.Tensor:
    """`tensor` on this process's device (no copy when it already is there). Non-blocking by
    default: a host-to-GPU copy of pinned or pageable memory does not stall the host."""
    return tensor.to(device(), non_blocking=non_blocking)
