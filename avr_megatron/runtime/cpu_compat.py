"""Let Megatron-Core 0.19 run on a machine without CUDA (tests, CI, the tiny recipe).

Megatron-Core assumes a GPU in many places: `torch.cuda.current_device()` for buffer placement,
hard-coded `device="cuda"` / `.cuda()`, the CUDA RNG state (seed tracker, activation recompute),
CUDA streams and events (DDP, pipeline p2p) and a `torch.cuda.FloatTensor` type assert in
gradient clipping. `activate()` patches exactly those, once per process, and only when
`torch.cuda.is_available()` is False; on a GPU machine it does nothing. It is called by
`avr_megatron.runtime.distributed.initialize` and nowhere else.

Every patch is listed in `PATCHES` with the reason, and `avr info` prints whether it is active.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")

# (patched object, reason) for each patch applied by activate(); empty when inactive.
PATCHES: list[tuple[str, str]] = []
_mode: TorchFunctionMode | None = None


def is_active() -> bool:
    return _mode is not None


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and makes `Tensor.cuda()` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return _backward_with_mode(self, func, args, kwargs)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        out = func(*args, **kwargs)
        if (func is torch.Tensor.type and len(args) == 1 and not kwargs
                and isinstance(out, str) and not out.startswith("torch.cuda.")):
            out = out.replace("torch.", "torch.cuda.", 1)
        return out


def _backward_with_mode(mode: TorchFunctionMode, func, args, kwargs):
    """A mode is popped while it handles a call, so a plain `loss.backward()` would run the whole
    backward pass, including activation-recompute forwards, without the CUDA->CPU rewrite. Run the
    autograd engine directly with the mode pushed again. (Megatron's schedules call the engine
    directly already.)"""
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    if func is torch.Tensor.backward:
        names = ("gradient", "retain_graph", "create_graph", "inputs")
        bound = dict(zip(names, args[1:]), **kwargs)
        tensors, grads = (args[0],), bound.get("gradient")
    else:
        names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
        bound = dict(zip(names, args[1:]), **kwargs)
        tensors, grads = args[0], bound.get("grad_tensors")
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    inputs = bound.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor)
                                        else tuple(inputs))
    create_graph = bool(bound.get("create_graph") or False)
    retain_graph = bound.get("retain_graph")
    retain_graph = create_graph if retain_graph is None else retain_graph
    with mode:
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)),
                            is_grads_batched=False)
        _engine_run_backward(tensors, grads, retain_graph, create_graph, inputs,
                             allow_unreachable=True, accumulate_grad=True)


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _Event()

    def synchronize(self):
        pass

    def query(self):
        return True


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _patch(obj, name: str, new, reason: str) -> None:
    setattr(obj, name, new)
    PATCHES.append((f"{getattr(obj, '__name__', type(obj).__name__)}.{name}", reason))


def activate() -> bool:
    """Apply the patches if CUDA is absent. Returns True when the layer is (now) active."""
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True
    import megatron.core.tensor_parallel.random as mrandom

    cuda = torch.cuda
    _patch(cuda, "current_device", lambda: _CPU,
           "~200 call sites place buffers on torch.cuda.current_device()")
    _patch(cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state(),
           "the model-parallel RNG tracker saves and restores the CUDA RNG state")
    _patch(cuda, "set_rng_state", lambda new_state, device="cuda": torch.set_rng_state(new_state),
           "the model-parallel RNG tracker saves and restores the CUDA RNG state")
    _patch(cuda, "manual_seed", lambda seed: torch.manual_seed(seed),
           "model_parallel_cuda_manual_seed seeds the CUDA generator")
    _patch(mrandom, "_get_cuda_rng_state",
           lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state(),
           "RNG tracker forks (dropout, init, recompute) read the CUDA RNG state")
    _patch(mrandom, "_set_cuda_rng_state",
           lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
           "RNG tracker forks (dropout, init, recompute) write the CUDA RNG state")
    _patch(cuda, "synchronize", lambda device=None: None,
           "pipeline p2p and timers synchronize the device")
    _patch(cuda, "current_stream", lambda device=None: _Stream(),
           "DDP grad sync and pipeline utilities use CUDA streams")
    _patch(cuda, "default_stream", lambda device=None: _Stream(),
           "DDP grad sync and pipeline utilities use CUDA streams")
    _patch(cuda, "Stream", _Stream, "DDP grad sync and pipeline utilities use CUDA streams")
    _patch(cuda, "Event", _Event, "DDP and timers record CUDA events")
    _patch(cuda, "stream", lambda stream=None: contextlib.nullcontext(),
           "DDP grad sync enters CUDA stream contexts")
    _mode = _CudaToCpu()
    _mode.__enter__()
    PATCHES.append(("TorchFunctionMode (process-wide)",
                    "~80 call sites pass device='cuda' or call .cuda(); clip_grads asserts "
                    "grad.type() == 'torch.cuda.FloatTensor'"))
    return True
