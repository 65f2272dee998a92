"""The Transformer Engine layer spec's checkpoint layout, on a machine without TE.

TE cannot be imported without a GPU, so a TE-spec GPTModel cannot be built in CI. Its
dist-checkpoint keys differ from the local spec's (which builds on CPU) by one object, read from
the sources (megatron-core 0.19.2, Transformer Engine 2.20):

- Layers: TELayerNormColumnParallelLinear (linear_qkv, linear_fc1) and TERowParallelLinear
  (linear_proj, linear_fc2) build their sharded state with the same
  `make_sharded_tensors_for_checkpoint(state, prefix, {"weight": 0, "bias": 0}, offsets)` call as
  ColumnParallelLinear / RowParallelLinear (extensions/transformer_engine.py,
  tensor_parallel/layers.py): `weight` and an `_extra_state` object each, plus the fused norm as
  `layer_norm_weight`, which the local spec writes under the same key for its separate norms
  (`sharded_state_dict_keys_map` in gpt_layer_specs.get_gpt_layer_local_submodules). The fc1
  SwiGLU factory is MLP's in both. TEDotProductAttention stores nothing for a standard softmax
  (its `sharded_state_dict`), and TE's own load hook drops its `_extra_state` from the missing
  keys; input_layernorm / pre_mlp_layernorm are IdentityOp.
- Final norm: TENorm builds TE's RMSNorm, a fusible op with `get_extra_state`
  (transformer_engine/pytorch/ops/op.py), so `sharded_state_dict_default` adds the ShardedObject
  `decoder.final_layernorm._extra_state` (shape (1,), offset (0,)); Megatron's WrappedTorchNorm
  has none. (With TE installed, TransformerBlock uses TENorm for the final norm of the local spec
  too: transformer_block.py LayerNormImpl.)
- Output layer: ColumnParallelLinear in both (TE's LM head only with fp8_output_proj + mxfp8);
  GPTModel.sharded_state_dict drops its `_extra_state`.

`TE_ONLY_OBJECTS` is that difference. `te_like(chunks)` gives a CPU model's final norm an extra
state the way TE's RMSNorm has one (and TE 2.20's refusal to unpickle it without
NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1), so tests save and load the TE spec's layout for real.
`bench/gpu_check.sh` compares the list with a real TE-spec model where TE is installed.
"""

from __future__ import annotations

import os
import pickle
import sys
import types
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch

TE_ONLY_OBJECTS = ("decoder.final_layernorm._extra_state",)


def _te_like_set_extra_state(self, state) -> None:
    """TE 2.20 `BasicOperation.set_extra_state`: None or empty is a no-op; a pickle is refused
    unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1, then loaded with plain `pickle`."""
    self.te_like_loaded = state
    if state is None or state.numel() == 0:
        return
    if os.getenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "0") != "1":
        raise RuntimeError("Refusing to load pickled Transformer Engine extra state for RMSNorm "
                           "(TE-like stand-in)")
    self.te_like_loaded = pickle.loads(state.detach().numpy(force=True).tobytes())


def te_like(chunks, extra_state=None) -> list:
    """Make each chunk's final norm (last pipeline stage) carry `_extra_state` like TE's RMSNorm:
    `extra_state()` (default: TE's empty uint8 tensor of a bf16 run) is what it saves."""
    from avr_megatron.models.llama import unwrap

    make = extra_state or (lambda: torch.empty(0, dtype=torch.uint8))
    for chunk in chunks:
        decoder = getattr(unwrap(chunk), "decoder", None)
        norm = getattr(decoder, "final_layernorm", None)
        if norm is None:
            continue
        norm.__class__ = type(f"TELike{type(norm).__name__}", (type(norm),), {
            "get_extra_state": lambda self: make(),
            "set_extra_state": _te_like_set_extra_state})
    return chunks


# ---- Stand-ins for transformer_engine.common.recipe (pickled as TE pickles its recipes) ----

class _FormatHelper(NamedTuple):
    max_fwd: float
    max_bwd: float


class Format(Enum):
    E4M3 = _FormatHelper(max_fwd=448, max_bwd=448)
    HYBRID = _FormatHelper(max_fwd=448, max_bwd=57344)


@dataclass
class DelayedScaling:
    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: object = "max"
    scaling_factor_compute_algo: object = None
    reduce_amax: bool = True


RECIPE_MODULE = "transformer_engine.common.recipe"


def install_recipe_stand_ins() -> list[str]:
    """Register the stand-in recipe classes as `transformer_engine.common.recipe` (and empty
    parent packages) so that pickles name TE's module, as a real TE FP8 state does. Megatron
    probes `import transformer_engine` when its modules are imported: import every Megatron
    module a test needs first (this imports the restricted unpickler's). Returns the module
    names added, for `remove_recipe_stand_ins`."""
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.safe_globals  # noqa: F401

    added = []
    for name in ("transformer_engine", "transformer_engine.common", RECIPE_MODULE):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so the child imports resolve
            sys.modules[name] = module
            added.append(name)
    recipe = sys.modules[RECIPE_MODULE]
    for cls in (_FormatHelper, Format, DelayedScaling):
        cls.__module__ = RECIPE_MODULE
        setattr(recipe, cls.__name__, cls)
    return added


def remove_recipe_stand_ins(added: list[str]) -> None:
    for name in added:
        sys.modules.pop(name, None)
    for cls in (_FormatHelper, Format, DelayedScaling):
        cls.__module__ = __name__


def delayed_scaling_payload(scale: float = 2.0) -> torch.Tensor:
    """A delayed-scaling FP8 extra state serialised the way TE 2.20 does (dict with the recipe
    and CPU tensors, `pickle.dumps` into a uint8 tensor). Needs install_recipe_stand_ins()."""
    recipe = sys.modules[RECIPE_MODULE].DelayedScaling(fp8_format=Format.HYBRID)
    state = {"recipe": recipe, "scale_fwd": torch.full((3,), scale),
             "amax_history_fwd": torch.arange(6.0).reshape(2, 3),
             "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True}}
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
