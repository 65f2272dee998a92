"""Transformer Engine `_extra_state` from a checkpoint, loaded without running its code.

TE modules keep their FP8 metadata in `_extra_state`. With delayed scaling (our default FP8
recipe) TE 2.x still serialises it with `pickle` into a uint8 tensor (module/base.py and
ops/op.py `get_extra_state`); stateless recipes (tensorwise, blockwise, mxfp8) and bf16 runs
store an empty tensor. Since TE 2.17.1, `set_extra_state` refuses a non-empty pickle unless
`NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1` (transformer_engine/pytorch/_extra_state.py), so every
FP8 resume would stop there; and setting that flag for the whole process would let any
checkpoint run code.

Here each payload is decoded first with Megatron-Core's restricted unpickler for FP8 extra
state (`megatron.core.safe_globals.SafeUnpickler`, which Megatron itself uses for grouped
linears): plain containers and numbers, torch tensors (storages through Megatron's
`weights_only=True` replacement of `torch.storage._load_from_bytes`), and TE's recipe classes
(including Megatron's TEDelayedScaling). Anything else (`os.system`, a user callable as
`amax_compute_algo`) is refused before it is called. The objects are then pickled again by us and
handed to TE with the flag set only around our own `load_state_dict` call: TE unpickles bytes we
produced from vetted objects, nothing else. A `None` or empty value (converted checkpoints, bf16
and stateless-FP8 runs) needs no decoding. TE's older io.BytesIO format (TE 1.x) would need an
unrestricted `torch.load`: refused.
"""

from __future__ import annotations

import io
import os
import pickle
from contextlib import contextmanager
from typing import Any, Iterator

import torch

UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
EXTRA_STATE_SUFFIX = "_extra_state"


class UnsafeExtraStateError(pickle.UnpicklingError):
    """A Transformer Engine `_extra_state` payload names a global outside TE's FP8 state."""


def decode(payload: bytes) -> Any:
    """The object a TE extra-state pickle holds, resolving only FP8 state types."""
    from megatron.core.safe_globals import SafeUnpickler

    try:
        return SafeUnpickler(io.BytesIO(payload)).load()
    except pickle.UnpicklingError as e:
        raise UnsafeExtraStateError(str(e).strip()) from None


def vet(value: Any, where: str) -> tuple[Any, bool]:
    """(value to hand to the module's set_extra_state, whether it is a pickle TE will load).
    A non-empty tensor is decoded with the restricted unpickler and re-encoded by us (uint8);
    raises UnsafeExtraStateError naming `where` for anything else that would be unpickled."""
    if isinstance(value, io.BytesIO):
        raise UnsafeExtraStateError(
            f"{where}: Transformer Engine extra state in the TE 1.x io.BytesIO format would "
            "need an unrestricted torch.load; not loaded")
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return value, False
    # TE unpickles the raw bytes of any non-empty tensor (whatever its dtype): so do we.
    try:
        state = decode(value.detach().cpu().numpy().tobytes())
    except UnsafeExtraStateError as e:
        raise UnsafeExtraStateError(f"{where}: {e}") from None
    except Exception as e:  # truncated or corrupt bytes
        raise UnsafeExtraStateError(f"{where}: unreadable Transformer Engine extra state "
                                    f"({type(e).__name__}: {e})") from None
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8), True


def vet_state_dict(state: dict, where: str) -> bool:
    """Vet every `_extra_state` entry of a module state dict in place; True when any of them
    is a pickle that TE will unpickle (so `te_may_unpickle` is needed around the load)."""
    needed = False
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] == EXTRA_STATE_SUFFIX:
            state[key], pickled = vet(value, f"{where}: {key}")
            needed |= pickled
    return needed


@contextmanager
def te_may_unpickle(enabled: bool) -> Iterator[None]:
    """Let TE unpickle extra state (its opt-in flag) for the duration of one load of vetted,
    re-encoded payloads; the previous environment is restored afterwards."""
    if not enabled:
        yield
        return
    previous = os.environ.get(UNSAFE_PICKLE_ENV)
    os.environ[UNSAFE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(UNSAFE_PICKLE_ENV, None)
        else:
            os.environ[UNSAFE_PICKLE_ENV] = previous
